"""`RewardEngine`: the public API. Latents (+ the policy's prompt embeddings) in, one reward per image out."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checks import (
    as_prompt_pair,
    check_latents,
    check_prompts,
    noise_levels,
    prompt_rows,
    resolve_device,
    resolve_dtype,
)
from engine.config import BackboneConfig, RewardConfig
from engine.heads import RewardHead, build_head
from engine.io import hub
from engine.io.backbone import base_source, load_backbone, random_backbone
from engine.io.checkpoint import save_reward_checkpoint
from engine.io.formats import open_reward_checkpoint
from engine.model.conditioning import Conditioning, check_conditioning_fits
from engine.model.mmdit import BackboneOutputs, MMDiTReward, check_outputs_finite, diffusers_state_dict
from engine.prompt_length import SD3_T5_TOKENS, PromptLength
from engine.reward_noise import CommonNoise, NoiseOption, check_noise_option
from engine.runtime.backends import Backends, in_engine_dtype
from kernels.backend import accumulation_dtype

PromptEmb = tuple[torch.Tensor, torch.Tensor] | Conditioning
NoiseArg = float | torch.Tensor | Sequence[float] | None  # t: the checkpoint's, one, per latent [B], an ensemble


class RewardEngine(nn.Module):
    """A latent reward: an SD3/SD3.5 MMDiT (the blocks its head reads) + a reward head (`engine.heads`).

    Build with `from_pretrained` (a reward checkpoint + a local base model), `from_diffusers` (an in-memory diffusers
    `SD3Transformer2DModel`) or `from_preset` (random weights: benchmarks and the embedded default). Serving options,
    keywords of every constructor: dtype="fp8" (block linears e4m3, inference only), fp8_adaln=True (adaLN weights
    e4m3 too, weight-only), fp8_fast_accum=True (Hopper's fast FP8 accumulation), adaln_on_host=True (adaLN weights
    in pinned host memory, streamed by `condition()`), kernels_backend, attention, check_finite; max_sequence_length
    and strict_prompt_length (`engine.prompt_length`: `from_pretrained` takes the checkpoint's T5 length)."""

    def __init__(
        self,
        backbone: MMDiTReward,
        head: RewardHead,
        reward: RewardConfig,
        *,
        kernels_backend: str | None = None,
        attention: str | None = None,
        check_finite: bool = True,
        fp8: bool = False,
        fp8_adaln: bool = False,
        fp8_fast_accum: bool = False,
        adaln_on_host: bool = False,
        max_sequence_length: int | None = None,
        strict_prompt_length: bool = False,
    ):
        super().__init__()
        if not fp8 and (fp8_adaln or fp8_fast_accum):
            raise ValueError("fp8_adaln and fp8_fast_accum refine dtype='fp8'; this engine is not fp8")
        reward.check_against(backbone.cfg)
        if head.readout != backbone.readout:
            raise ValueError(f"the head reads {head.readout}, but the backbone was built for {backbone.readout}")
        if head.outputs != reward.head_outputs:
            raise ValueError(f"the head predicts {head.outputs} outputs, the reward config says {reward.head_outputs}")
        self.backbone, self.reward_config = backbone, reward
        backbone.schedule = reward.schedule
        if fp8:
            from engine.runtime.fp8 import quantize_fp8

            quantize_fp8(backbone, adaln=fp8_adaln, fast_accum=fp8_fast_accum)
        # adaLN linears in pinned host memory, streamed by condition(): the device keeps only per-latent weights
        self.adaln_host_bytes = backbone.adaln_on_host() if adaln_on_host else 0
        if self.adaln_host_bytes and torch.cuda.is_available():
            torch.cuda.empty_cache()
        # the head runs in fp32 (fp64 for an fp64 backbone: gradient checks), features arrive in that dtype; a fresh
        # head is built on the CPU and follows the backbone's device
        self.head = head.to(self.device, accumulation_dtype(self.dtype))
        self.check_finite = check_finite
        # Tags this engine's Conditionings: another engine of the same config has other weights (see `condition`)
        self._identity = object()
        b = self.backbone
        prompt_path = [b.time_text_embed, b.context_embedder]
        prompt_path += [m for block in b.transformer_blocks for m in (block.norm1, block.norm1_context)]
        self._prompt_tensors = [t for m in prompt_path for t in (*m.parameters(), *m.buffers())]
        self.pixel = None  # engine.pixel.PixelFrontEnd, loaded on first score_images
        self.base_path: Path | None = None
        self._pixel_lock = threading.Lock()  # engines are shared between threads (engine.shared): load it once
        self.prompt_length = PromptLength(max_sequence_length, strict_prompt_length)
        self._common_noise = CommonNoise()
        self.backends = Backends.resolve(kernels_backend, attention, self.device, self.dtype, fp8=fp8)
        self.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------ construction

    @property
    def config(self) -> BackboneConfig:
        return self.backbone.cfg

    @property
    def device(self) -> torch.device:
        return self.backbone.context_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (bf16 for fp8 engines, whose block linears hold e4m3 weights)."""
        return self.backbone.context_embedder.weight.dtype

    def set_backends(self, kernels_backend: str | None = None, attention: str | None = None) -> None:
        """Choose the kernel backend (`auto`|`triton`|`torch`, default $DITREWARD_KERNELS; an fp64 engine always uses
        the torch references) and the attention backend (see `engine.runtime.attention`): a new `Backends` value, used
        by every forward this engine runs from now on."""
        self.backends = Backends.resolve(kernels_backend, attention, self.device, self.dtype, fp8=self.fp8)

    @property
    def kernels_backend(self) -> str:
        return self.backends.kernels

    @property
    def attention_backend(self) -> str:
        return self.backends.attention

    @property
    def fp8(self) -> bool:
        """Block linears e4m3 (built with dtype='fp8'): inference only."""
        return self.backends.fp8

    @fp8.setter
    def fp8(self, value: bool) -> None:
        self.backends = dataclasses.replace(self.backends, fp8=value)

    @classmethod
    def from_diffusers(
        cls,
        transformer: nn.Module,
        layers: Sequence[int] | None = None,
        t: float = 0.1,
        head: RewardHead | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        head_hidden: Sequence[int] = (1024, 256),
        **backends: Any,
    ) -> RewardEngine:
        """From an in-memory diffusers `SD3Transformer2DModel` (its weights are copied; blocks past max(layers) are
        not). `head=None` gives a freshly initialised head."""
        cfg = BackboneConfig.from_diffusers(transformer.config)
        reward = RewardConfig.for_backbone(cfg, layers=layers, t=t, head_hidden=tuple(head_hidden))
        param = next(transformer.parameters())
        head = head if head is not None else build_head(reward, cfg)
        compute, where = resolve_dtype(dtype, param.dtype), resolve_device(device, default=param.device)
        backbone = load_backbone(cfg, head.readout, [transformer.state_dict()], compute, where)
        return cls(backbone, head, reward, fp8=dtype == "fp8", **backends)

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        layers: Sequence[int] | None = None,
        t: float = 0.1,
        dtype: torch.dtype | str | None = torch.bfloat16,
        device: torch.device | str = "cpu",
        head_hidden: Sequence[int] = (1024, 256),
        config: BackboneConfig | None = None,
        head_outputs: int = 1,
        reward: dict[str, Any] | None = None,
        **backends: Any,
    ) -> RewardEngine:
        """A base SD3/SD3.5 model (diffusers dir or single file) with a fresh head: the trainer's starting point.
        `head_outputs=2` gives an uncertainty head (mean, log-std). `reward`: further `RewardConfig` fields (the head
        type, its text_layers and query_attention sizes)."""
        base = hub.resolve(base, "base model", hub.BASE_FILES)
        cfg, source = base_source(base, config)
        reward = RewardConfig.for_backbone(
            cfg, layers=layers, t=t, head_hidden=tuple(head_hidden), head_outputs=head_outputs, **(reward or {})
        )
        head = build_head(reward, cfg)
        backbone = load_backbone(
            cfg, head.readout, [source], resolve_dtype(dtype, torch.bfloat16), resolve_device(device, allow_meta=True)
        )  # (meta: the loaders' shape checks without weights)
        engine = cls(backbone, head, reward, fp8=dtype == "fp8", **backends)
        engine._attach_pixel(base)
        return engine

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        base: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = torch.bfloat16,
        device: torch.device | str = "cpu",
        **backends: Any,
    ) -> RewardEngine:
        """A reward checkpoint directory (any format of `engine.io.formats`: this engine's, or DiNa-LRM's, whose t is
        its `u`) on top of a local base model (diffusers directory or original single file; optional when the
        checkpoint holds every backbone weight). Either may be a hub id (`org/name`, `engine.io.hub`)."""
        checkpoint = hub.resolve(checkpoint, "reward checkpoint", hub.REWARD_FILES)
        if base is not None:
            base = hub.resolve(base, "base model", hub.BASE_FILES)
        found = open_reward_checkpoint(checkpoint, base)
        backends.setdefault("max_sequence_length", found.t5_tokens or SD3_T5_TOKENS)
        device = resolve_device(device)
        with torch.device("meta"):  # what the head reads (its shapes only): the backbone is checked and loaded first
            readout = build_head(found.reward, found.backbone).readout
        backbone = load_backbone(
            found.backbone, readout, found.sources, resolve_dtype(dtype, torch.bfloat16), device, found.adapter
        )
        engine = cls(backbone, found.head().to(device), found.reward, fp8=dtype == "fp8", **backends)
        if base is not None:
            engine._attach_pixel(base)
        return engine

    @classmethod
    def from_preset(
        cls,
        name: str = "tiny",
        layers: Sequence[int] | None = None,
        t: float = 0.1,
        dtype: torch.dtype | str | None = torch.bfloat16,
        device: torch.device | str = "cpu",
        seed: int = 0,
        **backends: Any,
    ) -> RewardEngine:
        """A preset backbone with RANDOM weights (latency/memory do not depend on the values)."""
        cfg = BackboneConfig.from_name(name)
        reward = RewardConfig.for_backbone(cfg, layers=layers, t=t)
        device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = build_head(reward, cfg)
        backbone = random_backbone(cfg, head.readout, resolve_dtype(dtype, torch.bfloat16), device, seed)
        return cls(backbone, head.to(device), reward, fp8=dtype == "fp8", **backends)

    def _attach_pixel(self, base: str | os.PathLike) -> None:
        """Remember a full SD3.5 diffusers directory: `score_images` loads its VAE and text encoders on first use."""
        self.base_path = Path(base) if Path(base).is_dir() and (Path(base) / "model_index.json").is_file() else None

    def pixel_front_end(self, **kwargs: Any):
        """The VAE + text encoders of the base directory (`engine.pixel.PixelFrontEnd`), loaded once, on demand;
        prompts encode at the engine's `prompt_length` unless `max_sequence_length=` says otherwise."""
        with self._pixel_lock:
            if self.pixel is None:
                from engine.pixel import PixelFrontEnd

                if getattr(self, "base_path", None) is None:
                    raise ValueError(
                        "score_images needs the VAE and text encoders of an SD3/SD3.5 diffusers directory: "
                        "build the engine with from_pretrained(..., base=<diffusers dir>) or from_base(<dir>)"
                    )
                kwargs.setdefault("dtype", self.dtype)
                kwargs.setdefault("max_sequence_length", self.prompt_length.t5_tokens)
                self.pixel = PixelFrontEnd.from_pretrained(self.base_path, device=self.device, **kwargs)
        return self.pixel

    @in_engine_dtype
    def score_images(
        self,
        images: Any,
        prompts: Sequence[str],
        *,
        seed: int | None = None,
        noise: NoiseOption = "fresh",
        max_side: int | None = None,
        normalize: bool = False,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """The pixel interface: images (PIL, paths, uint8 HWC arrays or float NCHW in [0, 1]) and one prompt each ->
        rewards [B] float32 in input order. Images are resized to multiples of 16 (see `engine.pixel.load_images`),
        VAE-encoded (posterior mean, then (z - shift) * scale), the prompts encoded as SD3's pipeline does (cached,
        at the engine's `prompt_length`), and scored on the latent path; images of different sizes are scored in
        separate groups. Noise: fresh; with `seed`, image i of the call uses stream i whatever the sizes of the
        others; `noise="common"`: each size group gets the `common_noise` of its shape (as the RL reward fns)."""
        check_noise_option(noise, seed, default="fresh")
        groups = self.pixel_front_end().prepare(images, prompts, max_side=max_side, progress=progress, seed=seed)
        rewards = torch.empty(sum(len(g.index) for g in groups), dtype=torch.float32, device=self.device)
        for g in groups:
            latents = g.latents.to(self.device, self.dtype)
            eps = self.common_noise(latents) if noise == "common" else g.noise  # (fp32: as the seeded kernel draws)
            rewards[g.index.to(self.device)] = self.score(
                latents,
                (g.prompt_embeds, g.pooled),
                noise=None if eps is None else eps.to(self.device),
                prompt_index=g.prompt_index.to(self.device),
                normalize=normalize,
            )
        return rewards

    def save_pretrained(self, directory: str | os.PathLike, include_backbone: bool = False, **metadata: Any) -> Path:
        """Write a reward checkpoint atomically (head always; the used backbone blocks if `include_backbone`).
        Keyword arguments are JSON metadata (e.g. the trainer's `training={...}`), stored under the checkpoint's
        "metadata" key, where they cannot shadow the core fields; `read_reward_config` returns them there."""
        if not include_backbone and self.backbone.merged_adapter:
            raise ValueError(
                f"{self.backbone.merged_adapter} is merged into this engine's blocks: save with include_backbone=True "
                "(the base alone would load without it)"
            )
        if include_backbone and self.fp8:
            raise ValueError(
                "include_backbone=True needs the bf16 weights, but this fp8 engine holds block linears quantised to "
                "e4m3 at load: save the backbone from an engine built with dtype='bf16' (checkpoints stay bf16)"
            )
        state = diffusers_state_dict(self.backbone) if include_backbone else None
        training = metadata.get("training", {})
        if self.prompt_length.enforced and isinstance(training, dict):  # a reloaded engine keeps the same length
            metadata = {**metadata, "training": {"max_sequence_length": self.prompt_length.t5_tokens, **training}}
        return save_reward_checkpoint(directory, self.reward_config, self.config, self.head, state, metadata)

    # ---------------------------------------------------------------------------------------------- scoring

    def common_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """The eps RL rewards use by default (`engine.reward_noise`): one fixed draw per latent shape, expanded over
        latents [B, C, H, W], on their device, float32; cached per (shape, device, dtype); a read-only view."""
        return self._common_noise.draw(latents)

    @in_engine_dtype
    def condition(
        self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, *, t: NoiseArg = None, grad: bool = False
    ) -> Conditioning:
        """Prompt-only work, once per prompt: prompt_embeds [P, L, joint_dim], pooled [P, pooled_dim]; each t's part is
        made once and kept (`cond.hits`/`misses`; `t=[...]` makes a sampler's ahead). `grad=True` keeps the graph
        (training the embedders, adaLN linears); otherwise no_grad, which may still feed `score(..., grad=True)`."""
        check_prompts(prompt_embeds, pooled, self.config, self.device, finite=self.check_finite)
        self.prompt_length.check(prompt_embeds.shape[1])
        schedule, default = self.reward_config.schedule, self.reward_config.t
        with torch.enable_grad() if grad else torch.no_grad():
            cond = self.backbone.condition(prompt_embeds.to(self.dtype), pooled.to(self.dtype), schedule.sigma(default))
        if self.check_finite:  # finite inputs can still overflow the adaLN linears (pooled x 1e20)
            cond.check_finite()
        cond = replace(cond, origin=(self._identity, self._prompt_weights_version()))
        for level in dict.fromkeys(noise_levels(t, 1, schedule, default)[0] if t is not None else []):
            cond.at(level, self.backbone.level_maker(grad, self.check_finite))
        return cond

    def _prompt_weights_version(self) -> int:
        """Changes whenever a weight `condition()` reads is modified in place (optimizer steps, load_state_dict):
        the sum of those tensors' autograd version counters. The tensors are listed once at construction (walking
        the modules per call cost ~1 ms on SD3.5-L); replacing a parameter object outright (load_state_dict with
        assign=True) is not seen."""
        return sum(t._version for t in self._prompt_tensors)

    @in_engine_dtype
    def features(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        *,
        t: NoiseArg = None,
        add_noise: bool = True,
        grad: bool = False,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """Pooled features [B, n_layers, D] float32 (float64 for a float64 engine) (Eq. 1-4) of a mean-pool head
        ([K B, ...] for an ensemble t, view-major).

        latents [B, C, H, W]: transformer-space latents (`(vae_latent - shift) * scale`, what the SD3 pipeline returns
        with output_type="latent"). prompt_emb: `(prompt_embeds [P, L, joint_dim], pooled [P, pooled_dim])` or a
        `Conditioning`; P == B, or P == 1 (one prompt for all), or `prompt_index` [B] picks a prompt per latent.
        noise: explicit eps [B, C, H, W]; seed: reproducible eps (image b uses stream b + image_offset); neither:
        fresh noise. grad=True keeps the graph so rewards backpropagate to the latents.
        t: None (the checkpoint's), a float, a float tensor [B] (per latent), or a list of K floats (the ensemble:
        each latent at K levels, one eps); a DiNa-LRM checkpoint's t is its `u` (`engine.schedule`). `add_noise=False`:
        the latents already are x_t at t (a sampler's state), scored as they are (no noise or seed)."""
        if not self.backbone.readout.pooled:
            raise ValueError(f"features() gives mean-pooled features: a {self.reward_config.head} head reads none")
        outputs, _ = self._forward(latents, prompt_emb, noise, seed, t, add_noise, grad, prompt_index, image_offset)
        return outputs.pooled if grad else outputs.pooled.clone()  # a normal tensor: callers may edit it, train on it

    def _forward(
        self, latents, prompt_emb, noise, seed, t, add_noise, grad, prompt_index, image_offset
    ) -> tuple[BackboneOutputs, int]:
        """The backbone's outputs of each forward row and the views K (inference-mode tensors unless `grad`)."""
        if not add_noise and (noise is not None or seed is not None):
            raise ValueError("add_noise=False scores the latents as the x_t they are: pass neither noise nor seed")
        cond = self.conditioning_for(latents, prompt_emb, noise, prompt_index, t=t, add_noise=add_noise, grad=grad)
        views = cond.context.shape[0] // latents.shape[0]
        with torch.enable_grad() if grad else torch.inference_mode():
            rows = (latents, cond.context, cond.modulation, cond.t, self.backends, noise, seed, image_offset)
            outputs = self.backbone(*rows, add_noise=add_noise, temb=cond.temb)
        if self.check_finite:
            check_outputs_finite(outputs, latents, cond.modulation)
        return outputs, views

    def _conditioning(self, prompt_emb: PromptEmb, grad: bool = False) -> Conditioning:
        """A Conditioning as given, or made from the SD3 pair. With host adaLN weights that streams them on every
        call: say so, once."""
        if isinstance(prompt_emb, Conditioning):
            return prompt_emb
        if self.adaln_host_bytes and not getattr(self, "_warned_streaming", False):
            self._warned_streaming = True
            warnings.warn(
                f"adaln_on_host: scoring with raw prompt embeddings streams {self.adaln_host_bytes / 2**30:.1f} GiB "
                f"of adaLN weights to the device on every call; make a Conditioning once per prompt batch with "
                f"engine.condition(prompt_embeds, pooled) and score against it",
                RuntimeWarning,
                stacklevel=5,
            )
        return self.condition(*as_prompt_pair(prompt_emb, self.config), grad=grad)

    @in_engine_dtype
    def score(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        *,
        t: NoiseArg = None,
        add_noise: bool = True,
        grad: bool = False,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        image_offset: int = 0,
        normalize: bool = False,
        return_std: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B] float32 (float64 for a float64 engine) (Eq. 5) — see `features` for the arguments; for an
        uncertainty head (`reward_config.head_outputs == 2`) the predicted mean. An ensemble t=[t1, ..., tK] runs one
        forward over the K B rows: a mean-pool head averages the K rewards, a query-attention head attends over the
        K views' tokens at once. `normalize=True` returns (r - mean) / std with the statistics the trainer stored
        (BT rewards are otherwise unbounded). `return_std=True` (uncertainty heads only) returns (rewards, std) [B]
        each, std = exp(log-std), divided by the stored std too when `normalize`."""
        if return_std and self.head.outputs != 2:
            raise ValueError(
                "return_std=True needs an uncertainty head (head_outputs 2, trained with loss='uncertainty'); this "
                "checkpoint's head predicts a point reward: call score without return_std"
            )
        outputs, views = self._forward(latents, prompt_emb, noise, seed, t, add_noise, grad, prompt_index, image_offset)
        with torch.enable_grad() if grad else torch.no_grad():
            prediction = self.head.predict(outputs, views)  # [B, head_outputs]
            reward = prediction[:, 0]
            if normalize:
                reward = (reward - self.reward_config.reward_mean) / self.reward_config.reward_std
            if not return_std:
                return reward
            std = prediction[:, 1].exp()
            return reward, std / self.reward_config.reward_std if normalize else std

    # ------------------------------------------------------------------------------------------- validation

    @in_engine_dtype
    def conditioning_for(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        *,
        t: NoiseArg = None,
        add_noise: bool = True,
        grad: bool = False,
    ) -> Conditioning:
        """Check latents [B, C, H, W] (and noise, t); the Conditioning row of each forward row (B, or K B for an
        ensemble) that every forward reads (`features`, `score`, `GraphedScorer`), its `t` the rows' sigma (a float, or
        [R] float32). Arguments as `features`."""
        check_latents(latents, noise, self.config, self.device, finite=self.check_finite)
        if grad and self.fp8:
            raise ValueError(
                "grad=True needs a bf16/fp32 engine: the FP8 path is inference-only (its quantised GEMMs have no "
                "backward); build the engine with dtype='bf16' for reward backprop"
            )
        batch = latents.shape[0]
        levels, _ = noise_levels(t, batch, self.reward_config.schedule, self.reward_config.t, add_noise)
        cond = self._conditioning(prompt_emb, grad)
        self._check_conditioning(cond)
        rows = prompt_rows(batch, cond.num_prompts, prompt_index, self.device, finite=self.check_finite)
        return cond.rows(rows, levels, self.backbone.level_maker(grad, self.check_finite))

    def _check_conditioning(self, cond: Conditioning) -> None:
        """A Conditioning from this engine's `condition()` with its current weights, or one built by hand that fits
        (shapes, dtype, device, t) and is finite (one sync, when `check_finite`)."""
        n_vectors = sum(self.backbone.modulation_sizes)
        check_conditioning_fits(cond, self.config, n_vectors, self.dtype, self.device)
        if cond.origin is None:
            if self.check_finite:
                cond.check_finite()
            return
        identity, version = cond.origin
        if identity is not self._identity:
            raise ValueError(
                "this Conditioning was made by another RewardEngine (same shapes, other weights: its rewards would "
                "be wrong): make it with this engine's condition(prompt_embeds, pooled)"
            )
        if version != self._prompt_weights_version():
            raise ValueError(
                "this Conditioning was made before the engine's prompt-path weights changed (an optimizer step or "
                "load_state_dict since): re-make it with engine.condition(prompt_embeds, pooled)"
            )
