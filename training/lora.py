"""LoRA fine-tuning of the backbone via `peft`: adapters on the blocks' projections, merged into plain weights for
export so that a reward checkpoint never needs peft at inference.

The backbone fuses each stream's q, k and v into one linear (`to_qkv`, `add_qkv`), so an adapter there is one rank-r
update of the fused [3D, D] weight: the same form as separate q/k/v adapters after merging, with shared A."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

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


def save_adapter(
    backbone: nn.Module, directory: str | os.PathLike, rank: int, alpha: float, targets: list[str]
) -> Path:
    """The adapters alone in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``), loadable with
    `peft.set_peft_model_state_dict` onto a backbone wrapped by `add_lora` with the same settings."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(backbone, adapter_name=ADAPTER_NAME)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / "adapter_model.safetensors")
    )
    _lora_config(rank, alpha, targets).save_pretrained(str(directory))
    return directory


__all__ = ["DEFAULT_LORA_TARGETS", "add_lora", "lora_layers", "merge_lora", "save_adapter"]
