"""Backbone presets and the reward configuration.

`BackboneConfig` mirrors diffusers' `SD3Transformer2DModel` config (same field names, so a diffusers
`transformer/config.json` maps onto it directly); `RewardConfig` holds what the DiT-Reward method adds: which
blocks are pooled, the noise level `t`, and the head's hidden sizes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# SD3/SD3.5 VAE latent normalisation: transformer-space z0 = (vae_latent - shift) * scale.
SD3_LATENT_SHIFT = 0.0609
SD3_LATENT_SCALE = 1.5305


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A sequence of integers (numpy ints included; not a string, not bools) as a tuple of ints."""
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(i, bool) for i in value):
            raise TypeError
        return tuple(operator.index(i) for i in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}") from None


def _positive_int(name: str, value: Any) -> int:
    """A positive integer (numpy ints included; not a float such as 16.0, not a bool, not a string)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


@dataclass(frozen=True)
class BackboneConfig:
    num_layers: int = 38
    num_attention_heads: int = 38
    attention_head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    joint_attention_dim: int = 4096  # width of prompt_embeds (T5-XXL d_model; CLIP states are zero-padded to it)
    pooled_projection_dim: int = 2048  # width of pooled (CLIP-L 768 + CLIP-G 1280)
    caption_projection_dim: int = 2432
    pos_embed_max_size: int = 192
    sample_size: int = 128
    qk_norm: str | None = "rms_norm"
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "dual_attention_layers",
            _int_tuple("BackboneConfig.dual_attention_layers", self.dual_attention_layers),
        )
        for name in (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "patch_size",
            "in_channels",
            "joint_attention_dim",
            "pooled_projection_dim",
            "caption_projection_dim",
            "pos_embed_max_size",
            "sample_size",
        ):
            object.__setattr__(self, name, _positive_int(f"BackboneConfig.{name}", getattr(self, name)))
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"BackboneConfig.qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.hidden_size}): the joint attention concatenates both streams"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside [0, {self.num_layers - 1}]")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_name(cls, name: str) -> BackboneConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown backbone preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> BackboneConfig:
        """Build from a diffusers `SD3Transformer2DModel` config (a dict or `FrozenDict`). A key the config lacks
        takes diffusers' default, as `SD3Transformer2DModel.from_pretrained` would: SD3-Medium's published
        config.json has no `qk_norm` (diffusers: None) and no `dual_attention_layers` (diffusers: none)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"a diffusers transformer config must be a mapping, got {type(config).__name__}")
        kwargs = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in dict(config).items() if k in _DIFFUSERS_DEFAULTS}}
        if kwargs["caption_projection_dim"] is None:
            kwargs["caption_projection_dim"] = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    def preset_name(self) -> str | None:
        """The preset this config equals, if any (sample_size is irrelevant to the reward)."""
        for name, preset in PRESETS.items():
            if dataclasses.replace(preset, sample_size=self.sample_size) == self:
                return name
        return None


# The keyword defaults of diffusers' `SD3Transformer2DModel.__init__` for BackboneConfig's fields: what a config
# key takes when absent, as `SD3Transformer2DModel.from_pretrained` would build it. A literal, so that reading a
# config does not import diffusers; tests check it against diffusers' signature.
_DIFFUSERS_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 18,
        "attention_head_dim": 64,
        "num_attention_heads": 18,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1152,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 96,
        "dual_attention_layers": (),
        "qk_norm": None,
    }
)


def _preset(**kw: Any) -> BackboneConfig:
    heads = kw["num_attention_heads"]
    return BackboneConfig(caption_projection_dim=heads * kw.get("attention_head_dim", 64), **kw)


PRESETS: dict[str, BackboneConfig] = {
    # 8.1B; 38 blocks of width 2432, qk RMSNorm, no dual attention.
    "sd35-large": _preset(num_layers=38, num_attention_heads=38, qk_norm="rms_norm", pos_embed_max_size=192),
    # 2.5B; dual attention (a second, image-only self-attention `attn2`) in blocks 0-12.
    "sd35-medium": _preset(
        num_layers=24,
        num_attention_heads=24,
        qk_norm="rms_norm",
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    ),
    # 2B; the original SD3, no qk-norm.
    "sd3-medium": _preset(num_layers=24, num_attention_heads=24, qk_norm=None, pos_embed_max_size=192),
    # A miniature with every feature (qk-norm, dual attention in block 0), random weights: runs in milliseconds on
    # a CPU. Its text widths match the tiny base directory that bench.tiny_base writes.
    "tiny": _preset(
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=96,
        pooled_projection_dim=80,
        pos_embed_max_size=32,
        sample_size=32,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ),
}

# Pooled blocks per depth. 38 blocks: the paper's choice; 24 blocks: the same relative depths (~0.4, 0.6, 0.75, 1.0).
DEFAULT_LAYERS: dict[int, tuple[int, ...]] = {38: (15, 23, 28, 37), 24: (9, 14, 18, 23), 4: (1, 3)}


def default_layers(num_layers: int) -> tuple[int, ...]:
    if num_layers in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[num_layers]
    fractions = (0.4, 0.6, 0.75, 1.0)
    return tuple(sorted({min(num_layers - 1, round(f * num_layers) - 1) for f in fractions if f * num_layers >= 1}))


@dataclass(frozen=True)
class RewardConfig:
    """What DiT-Reward adds to the backbone: pooled blocks (0-based), noise level t (Eq. 1), head sizes (Eq. 5)."""

    layers: tuple[int, ...] = (15, 23, 28, 37)
    t: float = 0.1
    head_hidden: tuple[int, ...] = (1024, 256)
    head_outputs: int = 1  # 1: a point reward; 2: mean and log-std (HPSv3's uncertainty loss)
    # Reward normalisation stats over validation pairs (set by the trainer; identity by default).
    reward_mean: float = 0.0
    reward_std: float = 1.0

    def __post_init__(self) -> None:
        for name in ("layers", "head_hidden"):
            object.__setattr__(self, name, _int_tuple(f"RewardConfig.{name}", getattr(self, name)))
        for name in ("t", "reward_mean", "reward_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.layers:
            raise ValueError("RewardConfig.layers must name at least one block")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"RewardConfig.layers must be strictly increasing without duplicates, got {self.layers}")
        if not 0.0 < float(self.t) < 1.0:
            raise ValueError(f"RewardConfig.t must lie in (0, 1), got {self.t}")
        if any(h < 1 for h in self.head_hidden):
            raise ValueError(f"RewardConfig.head_hidden sizes must be positive, got {self.head_hidden}")
        if isinstance(self.head_outputs, bool) or self.head_outputs not in (1, 2):
            raise ValueError(
                f"RewardConfig.head_outputs must be 1 (reward) or 2 (mean, log-std), got {self.head_outputs!r}"
            )
        if not self.reward_std > 0:
            raise ValueError(f"RewardConfig.reward_std must be > 0, got {self.reward_std}")

    def check_against(self, backbone: BackboneConfig) -> None:
        bad = [i for i in self.layers if not 0 <= i < backbone.num_layers]
        if bad:
            raise ValueError(
                f"reward layers {bad} out of range: this backbone has blocks 0..{backbone.num_layers - 1} "
                f"({backbone.num_layers} blocks)"
            )

    @classmethod
    def for_backbone(cls, backbone: BackboneConfig, **overrides: Any) -> RewardConfig:
        layers = overrides.pop("layers", None)
        cfg = cls(layers=tuple(layers) if layers is not None else default_layers(backbone.num_layers), **overrides)
        cfg.check_against(backbone)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"], d["head_hidden"] = list(self.layers), list(self.head_hidden)
        return d


__all__ = [
    "SD3_LATENT_SCALE",
    "SD3_LATENT_SHIFT",
    "BackboneConfig",
    "PRESETS",
    "RewardConfig",
    "default_layers",
]
