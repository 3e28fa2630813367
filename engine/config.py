"""Backbone presets and the reward configuration.

`BackboneConfig` mirrors diffusers' `SD3Transformer2DModel` config (same field names, so a diffusers
`transformer/config.json` maps onto it directly); `RewardConfig` holds what the DiT-Reward method adds: which
blocks are pooled, the noise level `t`, and the head's hidden sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, Strict, StrictInt, model_validator

from engine.schema import Schema, invalid, validate

# SD3/SD3.5 VAE latent normalisation: transformer-space z0 = (vae_latent - shift) * scale.
SD3_LATENT_SHIFT = 0.0609
SD3_LATENT_SCALE = 1.5305

# A sequence of integers (a JSON list or a Python tuple), kept as a tuple: configs are frozen and hashable.
Ints = Annotated[tuple[StrictInt, ...], Strict(False)]


def _size(default: int, most: int, what: str) -> Any:
    """A positive integer field bounded by what a real SD3-family model uses (SD3.5-L: 38 blocks x 38 heads x 64,
    text width 4096, table 192) with wide margin: a config cannot make the loader build a model of 10**9 blocks."""
    return Field(default, ge=1, le=most, description=what)


class BackboneConfig(Schema):
    """diffusers' `SD3Transformer2DModel` config fields that shape the reward backbone (same names)."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = _size(38, 256, "MMDiT blocks")
    num_attention_heads: int = _size(38, 256, "attention heads")
    attention_head_dim: int = _size(64, 512, "width of one head")
    patch_size: int = _size(2, 16, "latent pixels per patch side")
    in_channels: int = _size(16, 256, "latent channels")
    joint_attention_dim: int = _size(4096, 65536, "width of prompt_embeds (T5-XXL d_model; CLIP padded to it)")
    pooled_projection_dim: int = _size(2048, 65536, "width of pooled (CLIP-L 768 + CLIP-G 1280)")
    caption_projection_dim: int = _size(2432, 131072, "width of the projected text tokens (= heads x head_dim)")
    pos_embed_max_size: int = _size(192, 4096, "side of the positional-embedding table, in patches")
    sample_size: int = _size(128, 16384, "default latent side (unused by the reward)")
    qk_norm: Literal["rms_norm"] | None = Field("rms_norm", description="RMSNorm on q and k, or none (SD3-Medium)")
    dual_attention_layers: Ints = Field((), description="blocks with a second image-only attention (SD3.5-M)")

    @model_validator(mode="after")
    def _consistent(self) -> BackboneConfig:
        if self.caption_projection_dim != self.hidden_size:
            raise invalid(
                "caption_projection_dim",
                self.caption_projection_dim,
                f"num_attention_heads * attention_head_dim = {self.hidden_size} (the joint attention concatenates "
                "both streams)",
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise invalid("dual_attention_layers", bad, f"block indices in [0, {self.num_layers - 1}]")
        return self

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_name(cls, name: str) -> BackboneConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown backbone preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "diffusers transformer config") -> BackboneConfig:
        """Build from a diffusers `SD3Transformer2DModel` config (a dict or `FrozenDict`; `source` names it in
        errors). A key the config lacks takes diffusers' default, as `SD3Transformer2DModel.from_pretrained` would:
        SD3-Medium's published config.json has no `qk_norm` (diffusers: None) and no `dual_attention_layers`."""
        if not isinstance(config, Mapping):
            raise TypeError(f"a diffusers transformer config must be a mapping, got {type(config).__name__}")
        kwargs = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in dict(config).items() if k in _DIFFUSERS_DEFAULTS}}
        if kwargs["caption_projection_dim"] is None:
            kwargs["caption_projection_dim"] = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
        return validate(cls, kwargs, source)

    def preset_name(self) -> str | None:
        """The preset this config equals, if any (sample_size is irrelevant to the reward)."""
        for name, preset in PRESETS.items():
            if preset.model_copy(update={"sample_size": self.sample_size}) == self:
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


class RewardConfig(Schema):
    """What DiT-Reward adds to the backbone: pooled blocks (0-based), noise level t (Eq. 1), head sizes (Eq. 5)."""

    model_config = ConfigDict(frozen=True)

    layers: Ints = Field((15, 23, 28, 37), min_length=1, max_length=256, description="pooled blocks, 0-based")
    t: float = Field(0.1, gt=0.0, lt=1.0, description="Eq. 1 noise level the head was trained at")
    head_hidden: Ints = Field((1024, 256), max_length=8, description="hidden sizes of the head's MLP")
    head_outputs: int = Field(1, ge=1, le=2, description="1: a point reward; 2: mean and log-std (uncertainty loss)")
    # Reward normalisation stats over validation pairs (set by the trainer; identity by default).
    reward_mean: float = Field(0.0, description="mean reward over validation images")
    reward_std: float = Field(1.0, gt=0.0, description="reward std over validation images")

    # fields a checkpoint may omit (older checkpoints predate them)
    OPTIONAL_IN_FILES: ClassVar[frozenset[str]] = frozenset({"head_outputs"})

    @model_validator(mode="after")
    def _sizes(self) -> RewardConfig:
        if list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise invalid("layers", list(self.layers), "block indices >= 0, strictly increasing without duplicates")
        if not all(1 <= h <= 65536 for h in self.head_hidden):
            raise invalid("head_hidden", list(self.head_hidden), "sizes in [1, 65536]")
        return self

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


__all__ = [
    "SD3_LATENT_SCALE",
    "SD3_LATENT_SHIFT",
    "BackboneConfig",
    "PRESETS",
    "RewardConfig",
    "default_layers",
]
