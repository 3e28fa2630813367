"""The execution policy of one engine, as a value: which kernels run the fused ops, which attention, whether the block
linears are FP8. Resolved once when the engine is built, carried by the engine and handed to the model's forward;
nothing about it lives in process-global state, so engines with different policies can run side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.runtime.attention import BACKENDS as ATTENTION_BACKENDS
from engine.runtime.attention import resolve_backend


@dataclass(frozen=True)
class Backends:
    """Concrete choices only (`auto` is resolved by `resolve`)."""

    kernels: str = "torch"  # "triton" | "torch": who runs the fused ops of `kernels/`
    attention: str = "sdpa"  # a concrete backend of `engine.runtime.attention`
    fp8: bool = False  # block linears hold e4m3 weights (`engine.runtime.fp8.quantize_fp8` transformed the model)

    def __post_init__(self) -> None:
        if self.kernels not in ("triton", "torch"):
            raise ValueError(f"Backends.kernels must be 'triton' or 'torch' (resolved), got {self.kernels!r}")
        if self.attention not in ATTENTION_BACKENDS[1:]:
            raise ValueError(f"Backends.attention must be one of {ATTENTION_BACKENDS[1:]}, got {self.attention!r}")

    @classmethod
    def resolve(
        cls,
        kernels_backend: str | None,
        attention: str | None,
        device: torch.device,
        dtype: torch.dtype,
        fp8: bool = False,
    ) -> Backends:
        """The concrete backends for a model on `device` computing in `dtype`. Kernels: `auto` | `triton` | `torch`
        (default $DITREWARD_KERNELS; an fp64 model always uses the torch references: the Triton kernels compute in
        fp32 and fp64 is for gradient checks). Attention: see `engine.runtime.attention.resolve_backend`."""
        chosen = kernels.resolve(kernels_backend, device)
        if dtype == torch.float64:
            chosen = "torch"
        return cls(kernels=chosen, attention=resolve_backend(attention, device), fp8=fp8)
