"""LoRA adapters merged into the backbone's weights as they are loaded, without peft:

    W' = W + s · B @ A        s = alpha / r   (rsLoRA: alpha / sqrt(r)), per module as peft's LoraConfig gives them

computed in fp32 (a wider weight keeps its dtype) from the stored tensors; `load_backbone` then casts once to the
engine's dtype. The merge happens on diffusers' names, before the load hook fuses q/k/v, one weight at a time as the
loader asks for it, so memory stays bounded by one weight.

Two layouts of one adapter directory are read:
- peft's (`PeftModel.save_pretrained`, as DiNa-LRM publishes its `backbone_lora/`): ``adapter_config.json`` and
  ``adapter_model.safetensors`` with keys ``[base_model.model.]<module>.lora_A[.<adapter>].weight`` / ``lora_B``;
- diffusers' (`save_lora_weights`): ``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A
  .weight`` and the LoraConfig in the file's ``lora_adapter_metadata`` (absent: alpha = r per module, as diffusers
  assumes).
Module names are diffusers' (``attn.to_q``, ``attn.add_k_proj``, ...) or this backbone's fused ones (``attn.to_qkv``,
``add_qkv``, ``add_kv``): a fused adapter's B stacks the q/k/v parts' rows over one shared A, so the part for ``to_k``
is B's second row block."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError, safe_open

from engine.io.files import FileInputError, is_regular_file, parse_json, read_json
from engine.io.sources import TensorSource, describe_source
from engine.model.layers import FUSED_PROJECTIONS
from engine.schema import Schema, invalid, validate

ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # the safetensors metadata entry diffusers stores the LoraConfig under
DIFFUSERS_PREFIX = "transformer."  # diffusers' prefix of a pipeline's transformer keys (and of its metadata keys)
PEFT_PREFIX = "base_model.model."  # a PeftModel's prefix of the wrapped model's module names

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# peft options that describe the run, not the merged weight: any value is accepted
_RUN_ONLY = {
    "peft_version", "base_model_name_or_path", "revision", "task_type", "auto_mapping", "inference_mode",
    "lora_dropout", "megatron_core", "qalora_group_size", "layers_to_transform", "layers_pattern",
}  # fmt: skip
# initialisations that change the base weights themselves: their adapter only fits the converted base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _off(value: Any) -> bool:
    """An option that is not in use: null, false, zero, empty, or an object of such (peft's defaults)."""
    if isinstance(value, dict):
        return all(_off(v) for v in value.values())
    return value in (None, False, 0, "", [])


class LoraAdapterConfig(Schema):
    """The peft `LoraConfig` fields that decide a merged weight. Every other peft field is accepted only when it is
    off (null, false, empty) or only describes the run (`_RUN_ONLY`): a field this loader would not apply is refused
    rather than silently ignored."""

    model_config = ConfigDict(extra="allow")

    peft_type: Literal["LORA"] = "LORA"
    r: int = Field(ge=1, description="the adapters' rank")
    lora_alpha: float = Field(gt=0, description="scale numerator: s = alpha / r")
    use_rslora: bool = Field(False, description="s = alpha / sqrt(r)")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module pattern -> its own r")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module pattern -> its own alpha")
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_lora_weights: bool | str = True
    bias: Literal["none"] = "none"  # other values store bias tensors this loader does not merge

    @field_validator("init_lora_weights")
    @classmethod
    def _base_unchanged(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(
                f"an initialisation that leaves the base weights unchanged (true, 'gaussian'); a {value} adapter "
                "fits only its converted base: save it with peft's path_initial_model_for_weight_conversion"
            )
        return value

    @model_validator(mode="after")
    def _nothing_unapplied(self) -> LoraAdapterConfig:
        for key, value in (self.model_extra or {}).items():
            if key not in _RUN_ONLY and not _off(value):
                raise invalid(key, value, "null or false: a peft option this loader does not apply (merge with peft)")
        return self

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, s) of `module` as peft's LoRA layer gets them: the first `rank_pattern` / `alpha_pattern` key that
        matches the end of the module's name (a regular expression), else `r` / `lora_alpha`."""
        rank = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return rank, alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def selects(self, module: str) -> bool:
        """Whether peft would put an adapter on `module` (target_modules minus exclude_modules)."""
        if self.target_modules not in (None, "all-linear") and not _matches(self.target_modules, module):
            return False
        return self.exclude_modules is None or not _matches(self.exclude_modules, module)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def _matches(targets: list[str] | str, module: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def diffusers_parts(module: str) -> tuple[str, ...]:
    """The diffusers modules a module of ours stands for: a fused projection's q/k/v parts (``attn.to_qkv`` ->
    ``attn.to_q``, ``attn.to_k``, ``attn.to_v``), in the order their rows are stacked; any other module itself."""
    parent, _, leaf = module.rpartition(".")
    if leaf not in FUSED_PROJECTIONS:
        return (module,)
    return tuple(f"{parent}.{part}" if parent else part for part in FUSED_PROJECTIONS[leaf])


# ---------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Update:
    """The LoRA update of one diffusers weight: rows `part` of `parts` of s · B @ A (the whole of it when parts = 1)."""

    module: str  # as stored
    a_key: str
    b_key: str
    rank: int | None  # None: whatever the tensors say (diffusers' layout without metadata)
    scale: float | None  # None: 1 (alpha = r)
    part: int = 0
    parts: int = 1


class LoraAdapter:
    """An adapter directory, read and checked: its config, and the diffusers weight keys it updates. Tensors are read
    when `delta` asks for them. Build with `read_lora_adapter`; pass to `load_backbone(..., adapter=...)`."""

    def __init__(self, weights: TensorSource, path: Path, updates: dict[str, _Update], config_source: str | None):
        self.weights, self.path, self.updates, self.config_source = weights, path, updates, config_source

    def describe(self) -> str:
        return f"the LoRA adapter {self.path}"

    def delta(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """s · B @ A for the weight `key`, in fp32 (or `like`'s dtype if wider), checked against `like` (the weight)."""
        update = self.updates[key]
        a, b = self.weights[update.a_key], self.weights[update.b_key]
        where = f"{self.path}: LoRA of {update.module!r} ({update.b_key!r} {list(b.shape)} @ {update.a_key!r} " \
                f"{list(a.shape)})"  # fmt: skip
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: expected B [out, r] and A [r, in] (a LoRA of a linear layer)")
        if update.rank is not None and a.shape[0] != update.rank:
            raise ValueError(f"{where}: rank {a.shape[0]}, but {self.config_source} gives this module r={update.rank}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{where}: holds {a.dtype}/{b.dtype} tensors, expected floating point")
        if b.shape[0] % update.parts:
            raise ValueError(f"{where}: B's {b.shape[0]} rows do not split into {update.parts} q/k/v parts")
        b = b.chunk(update.parts)[update.part]
        dtype = torch.promote_types(like.dtype, torch.float32)
        delta = (b.to(dtype) @ a.to(dtype)) * (1.0 if update.scale is None else update.scale)
        if delta.shape != like.shape:
            raise ValueError(f"{where}: gives {list(delta.shape)} for {key!r}, but that weight is {list(like.shape)}")
        return delta

    def over(self, sources: list[Mapping[str, torch.Tensor]]) -> AdaptedWeights:
        return AdaptedWeights(self, sources)


class AdaptedWeights(Mapping):
    """The weights an adapter updates, merged: key -> W + s · B @ A, W read from the last of `sources` holding it.
    Placed after those sources, it overrides exactly the adapted weights (later sources win in `load_backbone`)."""

    def __init__(self, adapter: LoraAdapter, sources: list[Mapping[str, torch.Tensor]]):
        self.adapter, self.sources = adapter, list(sources)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.adapter.updates:
            raise KeyError(key)
        source = next((s for s in reversed(self.sources) if key in s), None)
        if source is None:
            raise ValueError(f"{self.adapter.path}: adapts {key!r}, which {self._under()} does not hold")
        weight = source[key]
        if not weight.is_floating_point():  # (load_backbone refuses it, naming the key)
            return weight
        delta = self.adapter.delta(key, weight)
        return weight.to(delta.dtype) + delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapter.updates)

    def __len__(self) -> int:
        return len(self.adapter.updates)

    def __contains__(self, key: object) -> bool:
        return key in self.adapter.updates

    def _under(self) -> str:
        return ", ".join(describe_source(s) for s in self.sources)

    def describe(self) -> str:
        return f"{self.adapter.describe()} merged into {self._under()}"


def read_lora_adapter(directory: str | os.PathLike) -> LoraAdapter:
    """A LoRA adapter directory in peft's or diffusers' layout (see the module docstring), checked: its config by
    `LoraAdapterConfig`, its keys (LoRA A/B pairs of one adapter, on modules the config selects). Errors name the file
    and the key. Tensors are read later, one weight at a time, by `load_backbone`."""
    directory = Path(directory)
    peft_file, diffusers_file = directory / PEFT_WEIGHTS, directory / DIFFUSERS_WEIGHTS
    peft_layout = is_regular_file(peft_file, "LoRA adapter weights")
    diffusers_layout = is_regular_file(diffusers_file, "LoRA adapter weights")
    if peft_layout and diffusers_layout:
        raise FileInputError(f"{directory}: holds both {PEFT_WEIGHTS} and {DIFFUSERS_WEIGHTS}, expected one adapter")
    if not (peft_layout or diffusers_layout):
        pickled = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
        raise FileNotFoundError(
            f"{directory}: no {PEFT_WEIGHTS} (+ {ADAPTER_CONFIG}, peft's layout) or {DIFFUSERS_WEIGHTS} (diffusers' "
            f"layout)"
            + (f"; {', '.join(pickled)} is pickled, which is not read: save as safetensors" if pickled else "")
        )
    path = peft_file if peft_layout else diffusers_file
    weights = TensorSource([path])
    if peft_layout:
        config_path = directory / ADAPTER_CONFIG
        if not is_regular_file(config_path, "LoRA adapter config"):
            raise FileNotFoundError(f"{config_path}: missing, expected peft's config beside {PEFT_WEIGHTS}")
        config_source = os.fspath(config_path)
        config = validate(LoraAdapterConfig, read_json(config_path, "LoRA adapter config"), config_source)
        prefix, required = PEFT_PREFIX, False
    else:
        config_source = f"{path} metadata {DIFFUSERS_METADATA!r}"
        config = _diffusers_config(path, config_source)
        prefix, required = DIFFUSERS_PREFIX, True
    updates = _updates(weights.stored_keys(), config, config_source, path, prefix, required)
    return LoraAdapter(weights, path, updates, config_source if config is not None else None)


def _diffusers_config(path: Path, source: str) -> LoraAdapterConfig | None:
    """The transformer's LoraConfig from a diffusers LoRA file's metadata, or None when it has none."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e} (corrupt or not a safetensors file)") from e
    if DIFFUSERS_METADATA not in metadata:
        return None
    raw = parse_json(metadata[DIFFUSERS_METADATA], source)
    if not isinstance(raw, dict):
        raise FileInputError(f"{source}: got {type(raw).__name__}, expected a JSON object")
    fields = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items() if k.startswith(DIFFUSERS_PREFIX)}
    return validate(LoraAdapterConfig, fields, source) if fields else None


def _updates(
    keys: set[str], config: LoraAdapterConfig | None, config_source: str, path: Path, prefix: str, required: bool
) -> dict[str, _Update]:
    """diffusers weight key -> its update, from the stored keys (checked: one adapter, A and B of each module)."""
    modules: dict[str, dict[str, str]] = {}
    adapters = set()
    for key in sorted(keys):
        name = key.removeprefix(prefix)
        match = _KEY.match(name)
        if (required and name == key) or match is None:
            expected = f"{prefix if required else f'[{prefix}]'}<module>.lora_A.weight / .lora_B.weight"
            raise ValueError(
                f"{path}: key {key!r} is not a LoRA weight of the transformer, expected {expected} (DoRA magnitudes, "
                "LoRA biases, saved whole modules and other models' weights are not supported)"
            )
        adapters.add(match["adapter"])
        modules.setdefault(match["module"], {})[match["part"]] = key
    if len(adapters) > 1:
        raise ValueError(f"{path}: holds adapters {sorted(map(str, adapters))}, expected one")
    if not modules:
        raise ValueError(f"{path}: holds no LoRA weights")
    updates = {}
    for module, parts in modules.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise ValueError(f"{path}: key {next(iter(parts.values()))!r} has no {missing} beside it")
        if config is not None and not config.selects(module):
            raise ValueError(
                f"{path}: key {parts['A']!r} adapts {module!r}, which {config_source} does not select (target_modules "
                f"{config.target_modules!r}, exclude_modules {config.exclude_modules!r})"
            )
        rank, scale = config.rank_and_scale(module) if config is not None else (None, None)
        names = diffusers_parts(module)
        for index, name in enumerate(names):
            updates[f"{name}.weight"] = _Update(module, parts["A"], parts["B"], rank, scale, index, len(names))
    return updates


__all__ = [
    "ADAPTER_CONFIG",
    "DIFFUSERS_METADATA",
    "DIFFUSERS_PREFIX",
    "DIFFUSERS_WEIGHTS",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS",
    "AdaptedWeights",
    "LoraAdapter",
    "LoraAdapterConfig",
    "diffusers_parts",
    "read_lora_adapter",
]
