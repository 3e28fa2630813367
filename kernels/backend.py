"""The one kernel-backend switch: ``auto`` | ``triton`` | ``torch`` (argument, else ``DITREWARD_KERNELS``)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

ENV_VAR = "DITREWARD_KERNELS"
BACKENDS = ("auto", "triton", "torch")

_warned_fallback = False  # `auto` falling back to torch warns once per process


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids."""
    return -(-a // b)


def row_tiles(n: int) -> tuple[int, int]:
    """Two power-of-two tiles covering a row of ``n`` elements held in registers: ``(a, b)``, ``a`` the largest power of
    two <= n (never masked) and ``b`` the smallest >= n - a (1 when n is a power of two: one masked lane, so that a
    kernel has no second code path). SD3.5-L's D = 2432 is 2048 + 512 lanes, 5% masked, where one 4096-lane tile
    masks 41%; its FFN row 9728 is 8192 + 2048."""
    if n < 1:
        raise ValueError(f"a row needs at least one element, got {n}")
    a = 1 << (n.bit_length() - 1)
    return a, 1 << max(n - a - 1, 0).bit_length()


def row_num_warps(lanes: int) -> int:
    """Warps for a program that holds a row of `lanes` fp32 values in registers: 8 from 2048 lanes, else 4."""
    return 8 if lanes >= 2048 else 4


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on `tensors` records an autograd graph here: only then does it go through its
    `autograd.Function` (an inference call launches the kernel directly, saving nothing for a backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def describe(x: object) -> str:
    """Short description of an argument for error messages."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What "compute in fp32" means for `dtype`: fp32, except fp64 stays fp64 (gradient checks run in fp64).
    (A plain comparison: `torch.promote_types` would be a dispatched op inside every traced forward.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once per process, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve(backend: str | None = None, device: torch.device | str | None = None) -> str:
    """Return the backend that will run: ``"triton"`` or ``"torch"``.

    ``backend`` defaults to the ``DITREWARD_KERNELS`` environment variable, then ``"auto"``. ``device`` is where the
    tensors live (``None``: CUDA when available).

    - ``auto``: Triton on a CUDA device when triton imports; otherwise the torch references, with one warning per
      process.
    - ``triton``: Triton or an error (``RuntimeError``) saying why it cannot run and how to fix it.
    - ``torch``: the pure-torch references.

    Every public kernel calls this on each launch, so a direct caller gets these errors too; for a name an engine
    already resolved (``"triton"``/``"torch"`` with a ``torch.device``) it costs about a microsecond.
    """
    if backend == "torch":
        return "torch"
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {requested!r}")
    if requested == "torch":
        return "torch"

    if device is None:
        on_cuda = torch.cuda.is_available()
    else:  # (rebuilding a torch.device from one costs more than the rest of this function)
        on_cuda = (device if isinstance(device, torch.device) else torch.device(device)).type == "cuda"
    has_triton = triton_available()

    if requested == "auto":
        if on_cuda and has_triton:
            return "triton"
        _warn_fallback("no CUDA device" if not on_cuda else "triton is not installed")
        return "torch"

    if not has_triton:
        raise RuntimeError(
            f"kernel backend 'triton' requested but triton is not installed: pip install triton, or set {ENV_VAR}=torch"
        )
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"kernel backend 'triton' on device {device or 'cpu'!s} needs a CUDA device, or "
            f"TRITON_INTERPRET=1 for the CPU interpreter, or {ENV_VAR}=torch"
        )
    return "triton"


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"DiT-Reward kernels: {reason}, using the torch reference ops (set {ENV_VAR}=torch to silence)",
            RuntimeWarning,
            stacklevel=3,
        )


class TritonHelper:
    """A ``@triton.jit`` device function shared by several kernels, decorated lazily (a kernel interpreted on the CPU
    must call interpreted helpers, a compiled one compiled helpers)."""

    def __init__(self, fn: Callable[..., Any], **jit_options: Any) -> None:
        self.fn = fn
        self.jit_options = jit_options  # keyword arguments of ``triton.jit``
        self._jitted: dict[bool, Any] = {}

    def jitted(self, mode: bool) -> Any:
        """The ``triton.jit`` function for `mode` (True: interpreted), helpers it calls bound in the same mode."""
        if mode not in self._jitted:
            import triton

            self._jitted[mode] = triton.jit(_bind_helpers(self.fn, mode), **self.jit_options)
        return self._jitted[mode]


class LazyKernel(TritonHelper):
    """``triton.jit`` deferred to the first launch.

    Triton decides between compiling and interpreting when a kernel is decorated, from ``TRITON_INTERPRET``; deferring
    the decoration lets ``import kernels`` happen before that variable is set, and without triton installed at all.
    Launch as usual: ``kernel[grid](*args, BLOCK=...)``. Device functions the kernel calls are ``triton_helper``s,
    jitted in the same mode as the kernel at its first launch. Inside ``observe_launches(callback)`` every launch
    first calls ``callback(kernel, args, kwargs)`` (``tools.cross_compile`` records them this way).
    """

    def __getitem__(self, grid: Any) -> Any:
        launch = self.jitted(interpreting())[grid]
        if not _launch_observers:
            return launch

        def observed(*args: Any, **kwargs: Any) -> Any:
            for callback in _launch_observers:
                callback(self, args, kwargs)
            return launch(*args, **kwargs)

        return observed


_launch_observers: list[Callable[[LazyKernel, tuple, dict], None]] = []


@contextlib.contextmanager
def observe_launches(callback: Callable[[LazyKernel, tuple, dict], None]) -> Iterator[None]:
    """Call ``callback(kernel, args, kwargs)`` before every Triton launch made inside the ``with`` block."""
    _launch_observers.append(callback)
    try:
        yield
    finally:
        _launch_observers.remove(callback)


def _bind_helpers(fn: Callable[..., Any], mode: bool) -> Callable[..., Any]:
    """`fn` with every `TritonHelper` it names replaced by that helper jitted in `mode` (a copy of the function over a
    copy of its globals: the module itself is not touched)."""
    used = {name: fn.__globals__.get(name) for name in fn.__code__.co_names}
    helpers = {name: g.jitted(mode) for name, g in used.items() if isinstance(g, TritonHelper)}
    if not helpers:
        return fn
    bound = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__)
    bound.__kwdefaults__, bound.__qualname__, bound.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    bound.__annotations__ = fn.__annotations__  # triton reads `tl.constexpr` parameters from the annotations
    bound.__module__ = fn.__module__
    return bound


def triton_kernel(fn: Callable[..., Any] | None = None, *, do_not_specialize: tuple[str, ...] = ()) -> Any:
    """Decorator for this package's Triton kernels (see ``LazyKernel``), bare or with ``triton.jit``'s
    ``do_not_specialize`` (integer arguments Triton would otherwise compile separately when equal to 1)."""
    if fn is None:
        return lambda f: LazyKernel(f, do_not_specialize=do_not_specialize)
    return LazyKernel(fn)


def triton_helper(fn: Callable[..., Any]) -> TritonHelper:
    """Decorator for device functions called from this package's kernels (see ``TritonHelper``)."""
    return TritonHelper(fn)
