"""LoRA fine-tuning of the backbone via `peft`: adapters on the blocks' projections, merged into plain weights for
export so that a reward checkpoint never needs peft at inference.

The backbone fuses each stream's q, k and v into one linear (`to_qkv`, `add_qkv`), so an adapter there is one rank-r
update of the fused [3D, D] weight: the same form as separate q/k/v adapters after merging, with shared A.
`save_adapter` writes the adapters for peft (these names) or for diffusers (split into its q/k/v modules)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from engine.io.atomic import atomic_write, atomic_write_text
from engine.io.lora import (
    ADAPTER_CONFIG,
    DIFFUSERS_METADATA,
    DIFFUSERS_PREFIX,
    DIFFUSERS_WEIGHTS,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    diffusers_parts,
)

# The attention projections (fused qkv of both streams, the outputs) and both FFN linears of every block. The adaLN
# modulation linears (`norm1.linear`) are left out: they see the prompt only.
DEFAULT_LORA_TARGETS = ("to_qkv", "add_qkv", "add_kv", "to_out.0", "to_add_out", "net.0.proj", "net.2")
ADAPTER_NAME = "default"  # peft's name for a model's single adapter


def _lora_config(rank: int, alpha: float, targets: list[str] | tuple[str, ...]):
    """peft's `LoraConfig` of the adapters `add_lora` wraps and `save_adapter` describes."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")


def add_lora(backbone: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...]) -> int:
    """Wrap `backbone`'s linears named (or ending in ``.``) one of `targets` with LoRA adapters, in place; every other
    backbone parameter is frozen. B starts at zero, so the wrapped backbone computes what it did. Returns the number
    of wrapped linears; ValueError when a target matches none."""
    from peft import inject_adapter_in_model

    names = [name for name, _ in backbone.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"lora_targets {unmatched} match no module of the backbone; its linears are named like "
            f"{sorted({n.split('.', 2)[-1] for n in names if n.startswith('transformer_blocks.0.')})[:12]}"
        )
    inject_adapter_in_model(_lora_config(rank, alpha, targets), backbone, adapter_name=ADAPTER_NAME)
    return sum(1 for _ in lora_layers(backbone))


def lora_layers(backbone: nn.Module):
    """(name, module) of the backbone's LoRA-wrapped linears."""
    from peft.tuners.lora import LoraLayer

    return ((name, m) for name, m in backbone.named_modules() if isinstance(m, LoraLayer))


@torch.no_grad()
def merge_lora(backbone: nn.Module) -> None:
    """Fold every adapter into its linear (W += alpha / r * B @ A) and put the plain `nn.Linear` back, in place: the
    backbone's state dict then has the keys of one that never had adapters."""
    for name, module in list(lora_layers(backbone)):
        module.merge(safe_merge=True)  # safe_merge: a non-finite merged weight raises instead of being written
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, module.get_base_layer())


ADAPTER_FORMATS = ("peft", "diffusers")  # `save_adapter`'s layouts (TrainConfig.save_adapter_format)


def save_adapter(
    backbone: nn.Module,
    directory: str | os.PathLike,
    rank: int,
    alpha: float,
    targets: list[str],
    format: str = "peft",
) -> Path:
    """The adapters alone (`rank`, `alpha`, `targets`: as given to `add_lora`), written atomically file by file, in
    `format`:

    - "peft": ``adapter_config.json`` + ``adapter_model.safetensors`` as `PeftModel.save_pretrained` writes them for
      this backbone (keys ``base_model.model.<module>.lora_A.weight``, our fused module names):
      `PeftModel.from_pretrained(engine.backbone, directory)` loads every key.
    - "diffusers": ``pytorch_lora_weights.safetensors`` as diffusers' `save_lora_weights` writes an SD3 transformer's
      (keys ``transformer.<module>.lora_A.weight``), the fused projections split into diffusers' q/k/v modules (B's
      row blocks over the shared A: the same update), and the LoraConfig in the file's ``lora_adapter_metadata``
      (without it diffusers would take alpha = r): `StableDiffusion3Pipeline.load_lora_weights(directory)` and
      `SD3Transformer2DModel.load_lora_adapter(directory, use_safetensors=True)` load it.

    Either layout merges at load without peft (`engine.io.lora.read_lora_adapter`); the other layout's files are
    removed from `directory`, so it holds one adapter."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if format not in ADAPTER_FORMATS:
        raise ValueError(f"save_adapter format must be one of {ADAPTER_FORMATS}, got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_state = get_peft_model_state_dict(backbone, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().cpu().contiguous() for k, v in peft_state.items()}  # "<module>.lora_A.weight", ...
    metadata = {"format": "pt"}
    if format == "peft":
        tensors, weights_file, stale = {PEFT_PREFIX + k: v for k, v in state.items()}, PEFT_WEIGHTS, [DIFFUSERS_WEIGHTS]
        config = json.dumps(_config_dict(rank, alpha, targets), indent=2, sort_keys=True)
        atomic_write_text(directory / ADAPTER_CONFIG, config)
    else:
        tensors, weights_file, stale = _diffusers_tensors(state), DIFFUSERS_WEIGHTS, [PEFT_WEIGHTS, ADAPTER_CONFIG]
        # exact module names, not `targets`: a diffusers model also has modules this backbone never built (later
        # blocks, the deepest block's text queries), which suffixes like "to_q" would give adapters without weights
        modules = sorted({k.removeprefix(DIFFUSERS_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
        config = {DIFFUSERS_PREFIX + k: v for k, v in _config_dict(rank, alpha, modules).items()}
        metadata[DIFFUSERS_METADATA] = json.dumps(config, sort_keys=True)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(directory / weights_file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), nbytes)
    for name in stale:
        (directory / name).unlink(missing_ok=True)
    return directory


def _diffusers_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This backbone's adapter state under diffusers' SD3 keys: each fused projection's B split into its q/k/v row
    blocks, each part with its own copy of the shared A (safetensors stores no tensors sharing memory)."""
    tensors = {}
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in state}):
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        parts = diffusers_parts(module)
        for name, rows in zip(parts, b.chunk(len(parts)), strict=True):
            tensors[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = a.clone()
            tensors[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = rows.clone()
    return tensors


def _config_dict(rank: int, alpha: float, targets: list[str]) -> dict:
    """`_lora_config` as JSON (what `LoraConfig.save_pretrained` writes; sets become sorted lists)."""
    config = _lora_config(rank, alpha, targets).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


__all__ = ["ADAPTER_FORMATS", "DEFAULT_LORA_TARGETS", "add_lora", "lora_layers", "merge_lora", "save_adapter"]
