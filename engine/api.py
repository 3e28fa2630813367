"""`RewardEngine`: the public API. Latents (+ the policy's prompt embeddings) in, one reward per image out."""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.config import BackboneConfig, RewardConfig
from engine.head import RewardHead
from engine.loading import (
    TensorSource,
    base_source,
    load_backbone,
    load_head,
    read_reward_config,
    save_reward_checkpoint,
)
from engine.model.conditioning import Conditioning
from engine.model.mmdit import MMDiTReward, diffusers_state_dict
from engine.runtime.backends import Backends
from kernels.backend import accumulation_dtype
from kernels.noise import noise_ref

PromptEmb = tuple[torch.Tensor, torch.Tensor] | Conditioning


def _dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, str):
        if dtype == "fp8":  # bf16 weights, quantised to e4m3 after loading (engine.runtime.fp8)
            return torch.bfloat16
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp16": torch.float16,
            "float16": torch.float16,
            "fp64": torch.float64,  # gradient checks only (torch.autograd.gradcheck), never a serving dtype
            "float64": torch.float64,
        }
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 or torch.float64, got {dtype}")
    return dtype


def resolve_device(device: torch.device | str | int | None, default: torch.device | str | None = None) -> torch.device:
    """`device` as a torch.device, refused with a ValueError when it does not parse or names a CUDA device this
    process cannot use. None means `default`, or CUDA when available else the CPU."""
    if device is None:
        device = default if default is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, a string like 'cuda:0' or 'cpu', or None, got "
                        f"{type(device).__name__}")  # fmt: skip
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} but CUDA is not available here (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}): pass device='cpu', or install a CUDA build of torch on a GPU machine"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} but this process sees {torch.cuda.device_count()} CUDA device(s): pick one "
                f"of cuda:0..cuda:{torch.cuda.device_count() - 1} (see CUDA_VISIBLE_DEVICES)"
            )
    return resolved


class RewardEngine(nn.Module):
    """DiT-Reward: an SD3/SD3.5 MMDiT (blocks 0..max(layers)) + an MLP head.

    Build with `from_pretrained` (a reward checkpoint + a local base model), `from_diffusers` (an in-memory diffusers
    `SD3Transformer2DModel`) or `from_preset` (random weights: benchmarks and the embedded default). Serving options,
    keywords of every constructor: dtype="fp8" (block linears e4m3, inference only), fp8_adaln=True (adaLN weights
    e4m3 too, weight-only), fp8_fast_accum=True (Hopper's fast FP8 accumulation), adaln_on_host=True (adaLN weights
    in pinned host memory, streamed by `condition()`), kernels_backend, attention, check_finite."""

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
    ):
        super().__init__()
        if not fp8 and (fp8_adaln or fp8_fast_accum):
            raise ValueError("fp8_adaln and fp8_fast_accum refine dtype='fp8'; this engine is not fp8")
        reward.check_against(backbone.cfg)
        if tuple(reward.layers) != backbone.layers:
            raise ValueError(f"reward layers {reward.layers} differ from the backbone's {backbone.layers}")
        if head.outputs != reward.head_outputs:
            raise ValueError(f"the head predicts {head.outputs} outputs, the reward config says {reward.head_outputs}")
        self.backbone, self.reward_config = backbone, reward
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
        reward = RewardConfig.for_backbone(
            cfg, t=t, head_hidden=tuple(head_hidden), **({"layers": tuple(layers)} if layers is not None else {})
        )
        param = next(transformer.parameters())
        backbone = load_backbone(
            cfg,
            reward.layers,
            [transformer.state_dict()],
            _dtype(dtype, param.dtype),
            resolve_device(device, default=param.device),
        )
        return cls(
            backbone, head if head is not None else cls._new_head(reward, cfg), reward, fp8=dtype == "fp8", **backends
        )

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
        **backends: Any,
    ) -> RewardEngine:
        """A base SD3/SD3.5 model (diffusers dir or single file) with a fresh head: the trainer's starting point.
        `head_outputs=2` gives an uncertainty head (mean, log-std)."""
        cfg, source = base_source(base, config)
        reward = RewardConfig.for_backbone(
            cfg,
            t=t,
            head_hidden=tuple(head_hidden),
            head_outputs=head_outputs,
            **({"layers": tuple(layers)} if layers is not None else {}),
        )
        backbone = load_backbone(cfg, reward.layers, [source], _dtype(dtype, torch.bfloat16), resolve_device(device))
        engine = cls(backbone, cls._new_head(reward, cfg), reward, fp8=dtype == "fp8", **backends)
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
        """A reward checkpoint directory (`reward_config.json`, `head.safetensors`, optional fine-tuned
        `backbone.safetensors`) on top of a local base model (diffusers directory or original single file). `base`
        may be omitted when the checkpoint carries every backbone weight it needs."""
        meta, reward, cfg = read_reward_config(checkpoint)
        sources = []
        if base is not None:
            base_cfg, source = base_source(base, cfg)
            if base_cfg != cfg and base_cfg != BackboneConfig(**{**cfg.to_dict(), "sample_size": base_cfg.sample_size}):
                raise ValueError(
                    f"base model {base} has config {base_cfg}, but the reward checkpoint {checkpoint} was "
                    f"trained on {cfg}"
                )
            sources.append(source)
        if meta["backbone_weights"] is not None:  # (a path checked to lie inside the checkpoint)
            sources.append(TensorSource([meta["backbone_weights"]]))
        if not sources:
            raise ValueError(
                f"reward checkpoint {checkpoint} holds no backbone weights: pass base=<SD3.5 diffusers "
                f"directory or single .safetensors file>"
            )
        device = resolve_device(device)
        backbone = load_backbone(cfg, reward.layers, sources, _dtype(dtype, torch.bfloat16), device)
        engine = cls(
            backbone, load_head(checkpoint, reward, cfg.hidden_size).to(device), reward, fp8=dtype == "fp8", **backends
        )
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
        from engine.loading import random_backbone

        cfg = BackboneConfig.from_name(name)
        reward = RewardConfig.for_backbone(cfg, t=t, **({"layers": tuple(layers)} if layers is not None else {}))
        device = resolve_device(device)
        backbone = random_backbone(cfg, reward.layers, _dtype(dtype, torch.bfloat16), device, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls._new_head(reward, cfg)
        return cls(backbone, head.to(device), reward, fp8=dtype == "fp8", **backends)

    @staticmethod
    def _new_head(reward: RewardConfig, cfg: BackboneConfig) -> RewardHead:
        return RewardHead(len(reward.layers), cfg.hidden_size, reward.head_hidden, reward.head_outputs)

    def _attach_pixel(self, base: str | os.PathLike) -> None:
        """Remember a full SD3.5 diffusers directory: `score_images` loads its VAE and text encoders on first use."""
        self.base_path = Path(base) if Path(base).is_dir() and (Path(base) / "model_index.json").is_file() else None

    def pixel_front_end(self, **kwargs: Any):
        """The VAE + text encoders of the base directory (`engine.pixel.PixelFrontEnd`), loaded once, on demand."""
        if self.pixel is None:
            from engine.pixel import PixelFrontEnd

            if getattr(self, "base_path", None) is None:
                raise ValueError(
                    "score_images needs the VAE and text encoders of an SD3/SD3.5 diffusers directory: "
                    "build the engine with from_pretrained(..., base=<diffusers dir>) or from_base(<dir>)"
                )
            kwargs.setdefault("dtype", self.dtype)
            self.pixel = PixelFrontEnd.from_pretrained(self.base_path, device=self.device, **kwargs)
        return self.pixel

    def score_images(
        self,
        images: Any,
        prompts: Sequence[str],
        *,
        seed: int | None = None,
        max_side: int | None = None,
        normalize: bool = False,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """The pixel interface: images (PIL, paths, uint8 HWC arrays or float NCHW in [0, 1]) and one prompt each ->
        rewards [B] float32 in input order. Images are resized to multiples of 16 (see `engine.pixel.load_images`),
        VAE-encoded (posterior mean, then (z - shift) * scale), the prompts encoded as SD3's pipeline does (cached),
        and scored on the latent path; images of different sizes are scored in separate groups. With `seed`, image i
        of the call uses noise stream i whatever the sizes of the others (its reward does not depend on them)."""
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        groups = self.pixel_front_end().prepare(images, prompts, max_side=max_side, progress=progress)
        rewards = torch.empty(sum(len(g.index) for g in groups), dtype=torch.float32, device=self.device)
        for g in groups:
            latents = g.latents.to(self.device, self.dtype)
            noise = None
            if seed is not None:  # the streams of the images' positions in the call, not in their size group
                noise = noise_ref(latents.shape, seed, streams=g.index, device=self.device).to(self.dtype)
            rewards[g.index.to(self.device)] = self.score(
                latents,
                (g.prompt_embeds, g.pooled),
                noise=noise,
                prompt_index=g.prompt_index.to(self.device),
                normalize=normalize,
            )
        return rewards

    def save_pretrained(self, directory: str | os.PathLike, include_backbone: bool = False, **metadata: Any) -> Path:
        """Write a reward checkpoint atomically (head always; the used backbone blocks if `include_backbone`).
        Keyword arguments are JSON metadata (e.g. the trainer's `training={...}`), stored under the checkpoint's
        "metadata" key, where they cannot shadow the core fields; `read_reward_config` returns them there."""
        if include_backbone and self.fp8:
            raise ValueError(
                "include_backbone=True needs the bf16 weights, but this fp8 engine holds block linears quantised to "
                "e4m3 at load: save the backbone from an engine built with dtype='bf16' (checkpoints stay bf16)"
            )
        state = diffusers_state_dict(self.backbone) if include_backbone else None
        return save_reward_checkpoint(directory, self.reward_config, self.config, self.head, state, metadata)

    # ---------------------------------------------------------------------------------------------- scoring

    def condition(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, *, grad: bool = False) -> Conditioning:
        """Prompt-only work, once per prompt: prompt_embeds [P, L, joint_dim], pooled [P, pooled_dim]. `grad=True`
        keeps the graph (training the embedders and adaLN linears); otherwise no_grad, whose outputs, unlike
        inference-mode tensors, may still feed a differentiable `score(..., grad=True)`."""
        self._check_prompts(prompt_embeds, pooled)
        with torch.enable_grad() if grad else torch.no_grad():
            cond = self.backbone.condition(prompt_embeds.to(self.dtype), pooled.to(self.dtype), self.reward_config.t)
        if self.check_finite:  # finite inputs can still overflow the adaLN linears (pooled x 1e20)
            cond.check_finite()
        return replace(cond, origin=(self._identity, self._prompt_weights_version()))

    def _prompt_weights_version(self) -> int:
        """Changes whenever a weight `condition()` reads is modified in place (optimizer steps, load_state_dict):
        the sum of those tensors' autograd version counters. The tensors are listed once at construction (walking
        the modules per call cost ~1 ms on SD3.5-L); replacing a parameter object outright (load_state_dict with
        assign=True) is not seen."""
        return sum(t._version for t in self._prompt_tensors)

    def features(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        *,
        grad: bool = False,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """Pooled features [B, n_layers, D] float32 (float64 for a float64 engine) (Eq. 1-4).

        latents [B, C, H, W]: transformer-space latents (`(vae_latent - shift) * scale`, what the SD3 pipeline returns
        with output_type="latent"). prompt_emb: `(prompt_embeds [P, L, joint_dim], pooled [P, pooled_dim])` or a
        `Conditioning`; P == B, or P == 1 (one prompt for all), or `prompt_index` [B] picks a prompt per latent.
        noise: explicit eps [B, C, H, W]; seed: reproducible eps (image b uses stream b + image_offset); neither:
        fresh noise. grad=True keeps the graph so rewards backpropagate to the latents."""
        feats = self._features(latents, prompt_emb, noise, seed, grad, prompt_index, image_offset)
        return feats if grad else feats.clone()  # a normal tensor: callers may edit it in place or train a head on it

    def _features(self, latents, prompt_emb, noise, seed, grad, prompt_index, image_offset) -> torch.Tensor:
        """`features` without the final copy: inference-mode tensors when grad=False (`score` reads them under
        no_grad, which hands back an ordinary tensor)."""
        self._check_latents(latents, noise)
        if grad and self.fp8:
            raise ValueError(
                "grad=True needs a bf16/fp32 engine: the FP8 path is inference-only (its quantised GEMMs have no "
                "backward); build the engine with dtype='bf16' for reward backprop"
            )
        cond = self._select(self._conditioning(prompt_emb, grad), latents.shape[0], prompt_index)
        context = torch.enable_grad() if grad else torch.inference_mode()
        with context:
            feats = self.backbone(
                latents, cond.context, cond.modulation, cond.t, self.backends, noise, seed, image_offset
            )
        if self.check_finite and not bool(torch.isfinite(feats).all()):
            raise ValueError(
                "the features overflowed to NaN/Inf although latents and prompt embeddings are finite: an input is "
                f"too large for {self.dtype} (largest |latent| {float(latents.abs().max()):.3g}, largest adaLN "
                f"|modulation| {float(cond.modulation.abs().max()):.3g}); check the latents' and prompts' scale"
            )
        return feats

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
                stacklevel=4,
            )
        return self.condition(*self._as_pair(prompt_emb), grad=grad)

    def score(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        *,
        grad: bool = False,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        image_offset: int = 0,
        normalize: bool = False,
        return_std: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B] float32 (float64 for a float64 engine) (Eq. 5) — see `features` for the arguments; for an
        uncertainty head (`reward_config.head_outputs == 2`) the predicted mean. `normalize=True` returns
        (r - mean) / std with the statistics the trainer stored (BT rewards are otherwise unbounded).
        `return_std=True` (uncertainty heads only) returns (rewards, std) [B] each, std = exp(log-std), divided by the
        stored std too when `normalize`."""
        if return_std and self.head.outputs != 2:
            raise ValueError(
                "return_std=True needs an uncertainty head (head_outputs 2, trained with loss='uncertainty'); this "
                "checkpoint's head predicts a point reward: call score without return_std"
            )
        feats = self._features(latents, prompt_emb, noise, seed, grad, prompt_index, image_offset)
        with torch.enable_grad() if grad else torch.no_grad():
            prediction = self.head.predict(feats)  # [B, head_outputs]
            reward = prediction[:, 0]
            if normalize:
                reward = (reward - self.reward_config.reward_mean) / self.reward_config.reward_std
            if not return_std:
                return reward
            std = prediction[:, 1].exp()
            return reward, std / self.reward_config.reward_std if normalize else std

    # ------------------------------------------------------------------------------------------- validation

    def _as_pair(self, prompt_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not (
            isinstance(prompt_emb, (tuple, list))
            and len(prompt_emb) == 2
            and all(isinstance(t, torch.Tensor) for t in prompt_emb)
        ):
            raise TypeError(
                "prompt_emb must be the SD3 pair (prompt_embeds [B, L, "
                f"{self.config.joint_attention_dim}], pooled [B, {self.config.pooled_projection_dim}]) or a "
                f"Conditioning from engine.condition(), got {type(prompt_emb).__name__}"
            )
        return prompt_emb[0], prompt_emb[1]

    def _check_prompts(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        cfg = self.config
        for name, x in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
            self._check_device(name, x)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"prompt_embeds must be [B, L, {cfg.joint_attention_dim}] (CLIP-L ‖ CLIP-G padded, then "
                f"T5), got {list(prompt_embeds.shape)}"
            )
        if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(
                f"pooled must be [B, {cfg.pooled_projection_dim}] (CLIP-L ‖ CLIP-G pooled), got {list(pooled.shape)}"
            )
        if prompt_embeds.shape[0] != pooled.shape[0]:
            raise ValueError(
                f"prompt_embeds and pooled batch sizes differ: {prompt_embeds.shape[0]} vs {pooled.shape[0]}"
            )
        if prompt_embeds.shape[0] == 0 or prompt_embeds.shape[1] == 0:
            raise ValueError(f"empty prompt batch: prompt_embeds has shape {list(prompt_embeds.shape)}")
        self._check_finite("prompt_embeds", prompt_embeds)
        self._check_finite("pooled", pooled)

    def _check_latents(self, latents: Any, noise: torch.Tensor | None) -> None:
        cfg = self.config
        if not isinstance(latents, torch.Tensor):
            raise TypeError(
                f"latents must be a torch.Tensor [B, {cfg.in_channels}, H, W], got {type(latents).__name__}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latents must be [B, {cfg.in_channels}, H, W] transformer-space latents, got {list(latents.shape)}"
            )
        if latents.shape[0] == 0:
            raise ValueError("empty batch: latents has batch size 0")
        p, limit = cfg.patch_size, cfg.patch_size * cfg.pos_embed_max_size
        h, w = latents.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(f"latents have no pixels: {h}x{w}")
        if h % p or w % p:
            raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {h}x{w}")
        if h > limit or w > limit:
            raise ValueError(
                f"latent size {h}x{w} exceeds this model's positional table: at most {limit}x{limit} "
                f"latent pixels ({limit * 8}x{limit * 8} image pixels)"
            )
        self._check_device("latents", latents)
        self._check_finite("latents", latents)
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a torch.Tensor like latents, got {type(noise).__name__}")
            if noise.shape != latents.shape:
                raise ValueError(f"noise must have the latents' shape {list(latents.shape)}, got {list(noise.shape)}")
            self._check_device("noise", noise)
            self._check_finite("noise", noise)

    def _check_device(self, name: str, x: torch.Tensor) -> None:
        if x.device != self.device and not (x.device.type == self.device.type == "cuda" and x.device.index is None):
            raise ValueError(
                f"{name} is on {x.device} but the engine is on {self.device}: move it with .to(engine.device)"
            )

    def _check_finite(self, name: str, x: torch.Tensor) -> None:
        # One device sync per input; disable with check_finite=False inside captured/compiled loops.
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values")

    def _check_conditioning(self, cond: Conditioning) -> None:
        """A Conditioning from this engine's `condition()` with its current weights, or one built by hand that fits
        (shapes, dtype, device, t) and is finite (one sync, when `check_finite`)."""
        dim = self.config.hidden_size
        n_vectors = sum(self.backbone.modulation_sizes)
        context, modulation = cond.context, cond.modulation
        if (
            modulation.ndim != 3
            or modulation.shape[1:] != (n_vectors, dim)
            or context.ndim != 3
            or context.shape[0] != modulation.shape[0]
            or context.shape[-1] != dim
        ):
            raise ValueError(
                f"this Conditioning does not fit the engine (context {list(context.shape)}, modulation "
                f"{list(modulation.shape)}; expected [P, L, {dim}] and [P, {n_vectors}, {dim}]): make it with this "
                f"engine's condition()"
            )
        if context.dtype != self.dtype or modulation.dtype != self.dtype:
            raise ValueError(f"Conditioning is {modulation.dtype}, the engine computes in {self.dtype}: re-condition")
        if cond.t != self.reward_config.t:
            raise ValueError(f"Conditioning was made at t={cond.t}, the engine scores at t={self.reward_config.t}")
        self._check_device("Conditioning", context)
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

    def _check_prompt_index(self, prompt_index: Any, batch: int, num_prompts: int) -> torch.Tensor:
        """prompt_index -> [batch] long on the engine's device, each in [0, num_prompts). The range check is free
        for a list or a CPU tensor and costs one sync for a device tensor (then only when `check_finite`)."""
        expected = f"{batch} integers in [0, {num_prompts - 1}] (one prompt row per latent)"
        if isinstance(prompt_index, torch.Tensor):
            self._check_device("prompt_index", prompt_index)
            index = prompt_index
        elif isinstance(prompt_index, (str, bytes)) or not isinstance(prompt_index, (Sequence, np.ndarray)):
            raise TypeError(f"prompt_index must be {expected}, got {type(prompt_index).__name__}")
        else:
            bad = [v for v in prompt_index if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
            if bad:
                raise TypeError(f"prompt_index must be {expected}, got an element {bad[0]!r}")
            bad = [v for v in prompt_index if not 0 <= v < num_prompts]  # before int64: 2**70 would overflow
            if bad:
                raise ValueError(f"prompt_index must be {expected}, got {bad[0]}")
            index = torch.tensor([int(v) for v in prompt_index], dtype=torch.long)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"prompt_index must be {expected}, got a {index.dtype} tensor")
        if index.shape != (batch,):
            raise ValueError(f"prompt_index must be {expected}, got shape {list(index.shape)}")
        if (self.check_finite or index.device.type == "cpu") and bool((index < 0).any() | (index >= num_prompts).any()):
            bad = index[(index < 0) | (index >= num_prompts)][0].item()
            raise ValueError(f"prompt_index must be {expected}, got {bad}")
        return index.to(self.device, torch.long)

    def _select(self, cond: Conditioning, batch: int, prompt_index: Any) -> Conditioning:
        self._check_conditioning(cond)
        if prompt_index is not None:
            return cond.select(self._check_prompt_index(prompt_index, batch, cond.num_prompts))
        if cond.num_prompts == batch:
            return cond
        if cond.num_prompts == 1:
            return cond.select(torch.zeros(batch, dtype=torch.long, device=cond.context.device))
        raise ValueError(
            f"batch sizes disagree: {batch} latents but {cond.num_prompts} prompts; pass one prompt per "
            f"latent, a single prompt, or prompt_index=[...] mapping latents to prompts"
        )
