"""An exponential moving average of the trainable weights: e <- decay e + (1 - decay) p after every optimizer step
(`TrainConfig.ema_decay`). Validation and the exported reward read the average (`applied`); the optimizer keeps
training the raw weights, and a checkpoint holds both, so a resumed run continues the same average."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """The average of `model`'s parameters that require grad, in their dtype and on their device."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay!r}")
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: e <- decay e + (1 - decay) p."""
        torch._foreach_mul_(self.average, self.decay)
        torch._foreach_add_(self.average, [p.detach() for p in self.params], alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its raw weights again after it (copied in place: the
        optimizer's references stay valid)."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average, strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Restore the average exactly; ValueError naming `source` unless it holds every parameter's, same shape."""
        if not isinstance(state, dict) or set(state) != set(self.names):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{source}: its EMA holds {got}, expected the trainable parameters {sorted(self.names)}")
        for name, average in zip(self.names, self.average, strict=True):
            if state[name].shape != average.shape:
                raise ValueError(
                    f"{source}: EMA of {name} has shape {list(state[name].shape)}, expected {list(average.shape)}"
                )
            average.copy_(state[name])


__all__ = ["EMA"]
