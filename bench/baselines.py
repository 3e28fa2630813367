"""Baselines that run in the same process as the engine (DESIGN.md, "Where numbers come from").

- `DiffusersHookReward`: what the paper's authors would write. The full diffusers `SD3Transformer2DModel` forward
  (every block, `norm_out`, `proj_out`, unpatchify) with forward hooks mean-pooling the image stream of the chosen
  blocks, then the MLP head.
- `compile_regional`: the same model with each `JointTransformerBlock` under `torch.compile`.
- `compile_whole`: the whole model under one `torch.compile`, CUDA graphs included on a GPU (`mode="reduce-overhead"`
  or `"max-autotune"`): the strongest bf16 peer (label `compile+cudagraphs`).
- `quantize_torchao_fp8`: torchao's dynamic rowwise FP8 on the block linears the engine's `dtype="fp8"` quantises
  (`is_engine_fp8_linear`), to be compiled afterwards: the ecosystem's FP8 peer (label `torchao fp8`).
- `HPSv3Reward`: the HPSv3 architecture (Qwen2-VL-7B + an MLP head on the last token), fed a 448² image
  (256 visual tokens after the 2×2 merge) inside a ~480-token instruction. `resize_to_448` is the step between the
  SD3 VAE decode and it.

All weights are random: latency and memory depend on shapes and kernels, not values (say so in every report).
Everything is dtype/device generic: bf16 on a GPU, fp32 on the CPU where the `tiny` variants run.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# Fast random construction


@contextlib.contextmanager
def _construct_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Allocate and initialise parameters directly on `device` in `dtype`.

    An 8B model built on the CPU in fp32 takes minutes of single-threaded init and 32 GB of host memory; built under
    the device context with the target default dtype, the default initialisers run as a few hundred GPU kernels.
    Buffers that their modules create with an explicit dtype (diffusers' sincos `pos_embed`, rotary `inv_freq`) keep
    it, so they come out as real values, not the garbage a meta + `to_empty` build would leave.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_sd3_transformer(
    preset_config: Mapping[str, Any], dtype: torch.dtype, device: str | torch.device
) -> SD3Transformer2DModel:
    """A diffusers `SD3Transformer2DModel` with random weights, built on `device` in `dtype`, in eval mode.

    `preset_config` uses diffusers' field names (e.g. `engine.config.BackboneConfig.to_dict()` or a diffusers
    `transformer/config.json`); keys the constructor does not take are ignored. The sincos `pos_embed` is the one
    diffusers computes, cast to `dtype` as `from_pretrained(torch_dtype=dtype)` would.
    """
    params = inspect.signature(SD3Transformer2DModel.__init__).parameters
    kwargs = {k: v for k, v in dict(preset_config).items() if k in params and k != "self"}
    if "dual_attention_layers" in kwargs:
        kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
    with _construct_on(device, dtype):
        transformer = SD3Transformer2DModel(**kwargs)
    # Parameters are already in `dtype`; only the fp32 sincos buffer needs the cast (casting the whole ModelMixin
    # would trip diffusers' keep-in-fp32 warning for nothing).
    transformer.pos_embed.to(dtype=dtype)
    return transformer.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# DiT-Reward the naive way: diffusers forward + hooks


def mlp_head(in_features: int, hidden: Sequence[int] = (1024, 256)) -> nn.Sequential:
    """The reward head of Eq. 5: Linear-GELU-...-Linear to one output."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class DiffusersHookReward:
    """DiT-Reward (Eq. 1–5) on an unmodified diffusers `SD3Transformer2DModel` with forward hooks.

    Args:
        transformer: the backbone (optionally after `compile_regional`).
        layers: 0-based indices into `transformer.transformer_blocks` whose image stream is pooled.
        t: noise level of Eq. 1, in (0, 1); the timestep is `1000 * t`.
        head: maps `[B, len(layers) * D]` to `[B, 1]`; default a random `mlp_head(len(layers) * D)` in fp32,
            because the pooled features are fp32 and the head's cost is negligible next to the backbone.
    """

    def __init__(
        self, transformer: SD3Transformer2DModel, layers: Sequence[int], t: float, head: nn.Module | None = None
    ) -> None:
        blocks = transformer.transformer_blocks
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise ValueError("layers must name at least one transformer block")
        bad = [i for i in self.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: this transformer has blocks 0..{len(blocks) - 1}")
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"t must lie in (0, 1), got {t}")
        self.transformer = transformer
        self.t = float(t)
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        if head is None:
            head = mlp_head(len(self.layers) * width).to(self.device).eval().requires_grad_(False)
        self.head = head
        self._pooled: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.layers]

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor | None, torch.Tensor]) -> None:
            # JointTransformerBlock returns (encoder_hidden_states, hidden_states); the image stream is second.
            # Pool here so that only [B, D] per layer outlives the block; accumulate in fp32 (Eq. 3).
            self._pooled[index] = output[1].mean(dim=1, dtype=torch.float32)

        return hook

    def remove(self) -> None:
        """Detach the hooks from the transformer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.inference_mode()
    def features(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features `[B, len(layers), D]` float32.

        Args:
            latents: z0 in the transformer's space, `[B, 16, H/8, W/8]`.
            prompt_embeds: `[B or 1, N_txt, joint_attention_dim]`; a batch of 1 serves every latent.
            pooled: `[B or 1, pooled_projection_dim]`.
            noise: eps of Eq. 1, shaped like `latents`; drawn fresh when None.
        """
        batch = latents.shape[0]
        for name, cond in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
            if cond.shape[0] not in (1, batch):
                raise ValueError(f"{name} batch must be 1 or match the latents' {batch}, got {cond.shape[0]}")
        z0 = latents.to(self.device, self.dtype)
        eps = torch.randn_like(z0) if noise is None else noise.to(self.device, self.dtype)
        z_t = (1.0 - self.t) * z0 + self.t * eps
        # The SD3 pipeline passes float timesteps (FlowMatch: 1000 * sigma).
        timestep = torch.full((batch,), 1000.0 * self.t, device=self.device, dtype=torch.float32)
        self._pooled.clear()
        self.transformer(
            hidden_states=z_t,
            encoder_hidden_states=prompt_embeds.to(self.device, self.dtype).expand(batch, -1, -1),
            pooled_projections=pooled.to(self.device, self.dtype).expand(batch, -1),
            timestep=timestep,
            return_dict=False,
        )
        features = torch.stack([self._pooled[i] for i in self.layers], dim=1)
        self._pooled.clear()
        return features

    @torch.inference_mode()
    def score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards `[B]` float32 (arguments as in `features`)."""
        features = self.features(latents, prompt_embeds, pooled, noise).flatten(1)
        head_dtype = next(self.head.parameters()).dtype
        return self.head(features.to(head_dtype)).squeeze(-1).float()


def compile_regional(transformer: SD3Transformer2DModel, **compile_kwargs: Any) -> SD3Transformer2DModel:
    """Regional `torch.compile`: each `JointTransformerBlock` compiled, the glue between them eager. In place.

    Defaults `fullgraph=True, dynamic=False`: the benchmark's shapes are fixed per row, and automatic-dynamic would
    recompile the second shape it meets with symbolic sizes, slowing every later row. Blocks share one code object
    (parameters are graph inputs), so all blocks of a kind reuse one graph per shape; the recompile limit is raised
    so that several benchmark shapes never silently fall back to eager.
    """
    compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
    _raise_recompile_limit()
    # diffusers' helper needs the model to declare `_repeated_blocks`; SD3 does not in diffusers 0.42.
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**compile_kwargs)
    else:
        for block in transformer.transformer_blocks:
            block.compile(**compile_kwargs)
    return transformer


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run on this machine (missing hardware or package); its message is the row's reason,
    e.g. "skipped: needs CUDA sm≥8.9"."""


def compile_modes(device: str | torch.device) -> tuple[str, ...]:
    """The `torch.compile` modes `compile_whole` is timed in: on CUDA both modes that capture CUDA graphs (the faster
    one is the peer, both are reported); elsewhere inductor's default, as no CUDA graphs exist there."""
    return ("reduce-overhead", "max-autotune") if torch.device(device).type == "cuda" else ("default",)


def compile_whole(transformer: SD3Transformer2DModel, mode: str = "reduce-overhead") -> SD3Transformer2DModel:
    """The whole `SD3Transformer2DModel` under one `torch.compile(mode=mode)`, in place; the block hooks of a
    `DiffusersHookReward` are traced into the graph (register them before the first call).

    `"reduce-overhead"` and `"max-autotune"` replay the forward as CUDA graphs on a GPU (one launch per call instead
    of thousands, which is what batch 1 needs); on the CPU inductor skips the graphs and `"default"` is the same code.
    `fullgraph=True`: a graph break would split the CUDA graph and misrepresent the peer, so it must fail loudly.
    `dynamic=False`: one static graph per benchmark shape, as a user serving fixed shapes would compile.
    """
    _raise_recompile_limit()
    transformer.compile(mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)
    return transformer


def _raise_recompile_limit() -> None:
    """Several benchmark shapes per compiled code object must never silently fall back to eager."""
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            break


def is_engine_fp8_linear(module: nn.Module, fqn: str) -> bool:
    """torchao `filter_fn`: the linears `engine.runtime.fp8.quantize_fp8` quantises by default, named in diffusers'
    `SD3Transformer2DModel` (`fqn` relative to it): every `nn.Linear` inside `transformer_blocks` except the adaLN
    modulation (`norm1.linear`, `norm1_context.linear`: prompt-only work, kept bf16 by the engine too)."""
    parts = fqn.split(".")
    return (
        isinstance(module, nn.Linear)
        and len(parts) > 2
        and parts[0] == "transformer_blocks"
        and not parts[2].startswith("norm1")
    )


def torchao_fp8_config() -> Any:
    """torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: e4m3 weights with a scale per
    output row, activations quantised per token at run time (the engine's FP8 scheme). Raises `BaselineUnavailable`
    when torchao is not installed (`pip install -e '.[gpu]'`)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError as err:
        raise BaselineUnavailable(f"skipped: torchao not installed ({err}); pip install -e '.[gpu]'") from err
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_torchao_fp8(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """torchao dynamic rowwise FP8 on `is_engine_fp8_linear`'s linears, in place (compile afterwards with
    `compile_whole`). torchao's FP8 GEMMs need FP8 tensor cores: on anything but CUDA compute capability ≥ 8.9 this
    raises `BaselineUnavailable("skipped: needs CUDA sm≥8.9 ...")` before touching the model."""
    device = next(transformer.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = device.type if device.type != "cuda" else "sm{}{}".format(*torch.cuda.get_device_capability(device))
        raise BaselineUnavailable(f"skipped: needs CUDA sm≥8.9 (FP8 tensor cores), this model is on {where}")
    config = torchao_fp8_config()
    from torchao.quantization import quantize_

    quantize_(transformer, config, filter_fn=is_engine_fp8_linear)
    return transformer


# --------------------------------------------------------------------------------------------------------------------
# HPSv3 architecture: Qwen2-VL-7B + MLP head on the last token

# Qwen2-VL-7B-Instruct's config.json, in the transformers 5.x layout (text and vision sub-configs).
QWEN2_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        # M-RoPE splits the 64 rotary frequencies of a 128-wide head into (temporal, height, width) sections.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

# Same code path in miniature for the CPU: patch and merge sizes kept so a 448² image still gives 256 tokens.
QWEN2_VL_TINY: dict[str, Any] = {
    "text_config": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1016,
        "eos_token_id": 1017,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    },
    # Special ids must lie inside the tiny vocabulary: the embedding lookup runs before image features replace them.
    "image_token_id": 1021,
    "video_token_id": 1022,
    "vision_start_token_id": 1019,
    "vision_end_token_id": 1020,
}

HPSV3_VARIANTS: dict[str, dict[str, Any]] = {"qwen2-vl-7b": QWEN2_VL_7B, "tiny": QWEN2_VL_TINY}

# The Qwen2-VL image processor normalises with OpenAI CLIP statistics.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Text tokens before the vision start token: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
# <|im_start|>user\n" in Qwen2's tokenizer; HPSv3 puts the image first in the user turn, then its instruction.
_PREFIX_TOKENS = 15


def qwen2_vl_config(variant: str = "qwen2-vl-7b") -> Any:
    """A transformers `Qwen2VLConfig` for one of `HPSV3_VARIANTS`, with SDPA attention."""
    from transformers import Qwen2VLConfig

    if variant not in HPSV3_VARIANTS:
        raise ValueError(f"unknown HPSv3 variant {variant!r}; expected one of {sorted(HPSV3_VARIANTS)}")
    spec = HPSV3_VARIANTS[variant]
    config = Qwen2VLConfig(
        text_config=dict(spec["text_config"]),
        vision_config=dict(spec["vision_config"]),
        **{k: v for k, v in spec.items() if k not in ("text_config", "vision_config")},
    )
    # SDPA everywhere: flash-attn is not a dependency, and eager attention would handicap the baseline.
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


class HPSv3Reward(nn.Module):
    """The HPSv3 architecture with random weights: Qwen2-VL (vision tower + LM, no LM head) reading one image and an
    instruction, and an MLP `rm_head` on the last token's final hidden state.

    The token layout is fixed at construction: `_PREFIX_TOKENS` text tokens, vision start, `n_image_tokens` image
    pads, vision end, then instruction tokens up to `seq_len` in all. Text ids are random (seeded), below the special
    ids. Position ids (M-RoPE, `[3, B, L]`) are precomputed as `get_rope_index` would compute them, which also keeps
    the call free of transformers-version differences (5.x made `mm_token_type_ids` a required input for them).

    Args:
        variant: "qwen2-vl-7b" (7.6B parameters without the LM head) or "tiny" (same code path, CPU-sized).
        image_size: square input side in pixels, a multiple of patch_size * spatial_merge_size (28).
        seq_len: total tokens per sequence, image tokens included.
    """

    def __init__(
        self,
        variant: str = "qwen2-vl-7b",
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        image_size: int = 448,
        seq_len: int = 480,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        config = qwen2_vl_config(variant)
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        if image_size % unit:
            raise ValueError(f"image_size must be a multiple of {unit} (patch x merge), got {image_size}")
        self.config = config
        self.image_size = image_size
        self.grid = image_size // vision.patch_size  # patches per side, before the merge
        self.n_image_tokens = (self.grid // vision.spatial_merge_size) ** 2
        n_suffix = seq_len - _PREFIX_TOKENS - 2 - self.n_image_tokens
        if n_suffix < 1:
            raise ValueError(f"seq_len {seq_len} too short for {self.n_image_tokens} image tokens plus the template")
        self.seq_len = seq_len

        with _construct_on(device, dtype):
            self.model = Qwen2VLModel(config)
            hidden = config.text_config.hidden_size
            self.rm_head = nn.Sequential(nn.Linear(hidden, 1024), nn.GELU(), nn.Linear(1024, 1))
        self.eval().requires_grad_(False)

        gen = torch.Generator().manual_seed(seed)
        text_high = min(config.vision_start_token_id, config.vision_end_token_id, config.image_token_id)
        prefix = torch.randint(0, text_high, (_PREFIX_TOKENS,), generator=gen)
        suffix = torch.randint(0, text_high, (n_suffix,), generator=gen)
        input_ids = torch.cat(
            [
                prefix,
                torch.tensor([config.vision_start_token_id]),
                torch.full((self.n_image_tokens,), config.image_token_id),
                torch.tensor([config.vision_end_token_id]),
                suffix,
            ]
        )
        self.register_buffer("input_ids", input_ids.to(device), persistent=False)  # [L]
        self.register_buffer("position_ids", self._mrope_positions(n_suffix).to(device), persistent=False)  # [3, L]
        mean = torch.tensor(_CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean.to(device), persistent=False)
        self.register_buffer("pixel_std", std.to(device), persistent=False)

    def _mrope_positions(self, n_suffix: int) -> torch.Tensor:
        """M-RoPE position ids `[3, L]` (temporal, height, width) for the fixed layout, as `get_rope_index` builds
        them: text counts up on all three axes; the image's tokens sit at (s, s + row, s + col) for s the position
        after the vision start token; text resumes at s + max(rows, cols)."""
        side = self.grid // self.config.vision_config.spatial_merge_size
        start = _PREFIX_TOKENS + 1
        text_before = torch.arange(start).expand(3, -1)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        image = torch.stack([torch.zeros(side * side, dtype=torch.long), rows.flatten(), cols.flatten()]) + start
        text_after = torch.arange(n_suffix + 1).expand(3, -1) + start + side  # vision end + instruction
        return torch.cat([text_before, image, text_after], dim=1)

    def patchify(self, images_01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the Qwen2-VL image processor produces, minus its resize (inputs are already `image_size`²).

        Args:
            images_01: `[B, 3, image_size, image_size]` in [0, 1].
        Returns:
            pixel_values `[B * grid², 3 * temporal_patch * patch²]` in the model dtype (rows ordered merge-window by
            merge-window, as the vision tower's merger expects), image_grid_thw `[B, 3]` = (1, grid, grid).
        """
        batch, channels, height, width = images_01.shape
        if channels != 3 or height != self.image_size or width != self.image_size:
            raise ValueError(
                f"expected images [B, 3, {self.image_size}, {self.image_size}], got {list(images_01.shape)}; "
                "resize with resize_to_448 first"
            )
        vision = self.config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        x = (images_01.float() - self.pixel_mean) / self.pixel_std
        g = self.grid
        x = x.reshape(batch, 3, g // merge, merge, patch, g // merge, merge, patch)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, g/m, g/m, m, m, C, p, p]
        # A still image is its own temporal pair: the processor repeats it temporal_patch_size times.
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
        pixel_values = x.reshape(batch * g * g, 3 * temporal * patch * patch).to(self.model.dtype)
        grid_thw = torch.tensor([[1, g, g]], device=images_01.device).expand(batch, -1)
        return pixel_values, grid_thw

    @torch.inference_mode()
    def score(self, images_01: torch.Tensor) -> torch.Tensor:
        """Rewards `[B]` float32 for images `[B, 3, image_size, image_size]` in [0, 1], one sequence per image."""
        batch = images_01.shape[0]
        pixel_values, grid_thw = self.patchify(images_01)
        out = self.model(
            input_ids=self.input_ids.expand(batch, -1),
            position_ids=self.position_ids[:, None, :].expand(-1, batch, -1),
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            use_cache=False,
        )
        return self.rm_head(out.last_hidden_state[:, -1]).squeeze(-1).float()


def resize_to_448(images: torch.Tensor, size: int = 448) -> torch.Tensor:
    """Bilinear resize with antialias, `[B, 3, H, W]` -> `[B, 3, size, size]`, same dtype.

    Computed in fp32: the CPU antialiased kernel has no bf16 implementation, and on a GPU the upcast of a few
    images costs microseconds.
    """
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.to(images.dtype)


__all__ = [
    "HPSV3_VARIANTS",
    "QWEN2_VL_7B",
    "QWEN2_VL_TINY",
    "BaselineUnavailable",
    "DiffusersHookReward",
    "HPSv3Reward",
    "build_sd3_transformer",
    "compile_modes",
    "compile_regional",
    "compile_whole",
    "is_engine_fp8_linear",
    "quantize_torchao_fp8",
    "torchao_fp8_config",
    "mlp_head",
    "qwen2_vl_config",
    "resize_to_448",
]
