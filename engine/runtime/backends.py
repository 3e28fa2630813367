"""The execution policy of one engine, as a value: which kernels run the fused ops, which attention, whether the block
linears are FP8. Resolved once when the engine is built, carried by the engine and handed to the model's forward;
nothing about it lives in process-global state, so engines with different policies can run side by side."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

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


Method = TypeVar("Method", bound=Callable)


def in_engine_dtype(method: Method) -> Method:
    """Run an engine method (``self.device``) in the engine's own dtype whatever `torch.autocast` the caller has on:
    ambient autocast is thread-local state the engine does not take (Flow-GRPO samples under fp16 autocast, which
    would make Conditionings in its dtype and run the head in reduced precision)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not torch.is_autocast_enabled(self.device.type):  # (entering the context costs ~8 us on a CPU)
            return method(self, *args, **kwargs)
        with torch.autocast(self.device.type, enabled=False):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
