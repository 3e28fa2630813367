"""The HPSv3 baseline, in the same process as the engine (DESIGN.md, "Where numbers come from").

- `HPSv3Reward`: the HPSv3 architecture (Qwen2-VL-7B + an MLP head on the last token), fed a 448² image
  (256 visual tokens after the 2×2 merge) inside a ~480-token instruction.
- `resize_to_448`: the step between the SD3 VAE decode and it.

All weights are random: latency and memory depend on shapes and kernels, not values (say so in every report).
Everything is dtype/device generic: bf16 on a GPU, fp32 on the CPU where the `tiny` variant runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.baselines import construct_on

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

        with construct_on(device, dtype):
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
    "HPSv3Reward",
    "qwen2_vl_config",
    "resize_to_448",
]
