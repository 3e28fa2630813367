"""The model's time convention, in one place: the noise level `t` a caller asks for -> the sigma of the noised
latent (z_t = (1 - sigma) z0 + sigma eps, Eq. 1) and the timestep fed to the time embedding.

- `direct` (DiT-Reward checkpoints): sigma = t, timestep = 1000 t.
- `flow_match_table` (DiNa-LRM checkpoints): t is their `u`, a target sigma snapped to the nearest entry of the
  shifted FlowMatch-Euler training table that diffusers' `FlowMatchEulerDiscreteScheduler` builds (no dynamic
  shifting): s_i = (N - i) / N, sigma_i = shift s_i / (1 + (shift - 1) s_i), timestep_i = N sigma_i, i = 0..N-1,
  all in fp32; index = argmin_i |sigma_i - u| (the first on a tie). At u = 0.1 the model sees sigma 0.10075 and
  timestep 100.746, as DiNa-LRM's `DRMInferencer.reward` computes them.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from engine.schema import Schema


class TimeSchedule(Schema):
    """Maps the caller's noise level t to (sigma, timestep); see the module docstring."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["direct", "flow_match_table"] = Field("direct", description="sigma = t, or the nearest table sigma")
    num_train_timesteps: int = Field(1000, ge=2, le=100000, description="entries of the FlowMatch table")
    shift: float = Field(3.0, gt=0.0, le=1000.0, description="the table's shift (SD3.5: 3.0)")

    def check(self, t: float, what: str = "t", noised: bool = True) -> None:
        """ValueError unless t is a noise level this schedule scores at (naming `what`); pure noise (sigma 1) only
        for latents that already are x_t (`noised=False`: a sampler's first step)."""
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{what} must be a finite float noise level, got {t!r}")
        if self.kind == "direct":
            if not (0.0 < t < 1.0 or (t == 1.0 and not noised)):
                raise ValueError(f"{what} must lie in (0, 1) (the noise level sigma, e.g. 0.1), got {t}")
            return
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{what} must lie in [0, 1] (DiNa-LRM's u, a target sigma, e.g. 0.4), got {t}")
        if noised and self.sigma(t) >= 1.0:
            raise ValueError(f"{what}={t} snaps to sigma 1 (pure noise, nothing of the latent left): use a smaller t")

    def sigma(self, t: float) -> float:
        """The sigma of z_t for the caller's t (a Python float; an fp32 value for the table)."""
        if self.kind == "direct":
            return float(t)
        return _nearest_sigma(self.num_train_timesteps, self.shift, float(t))

    def timestep(self, sigma: float) -> float:
        """The timestep the time embedding reads at `sigma` (a value `sigma` returned)."""
        if self.kind == "direct":
            return 1000.0 * sigma
        return float(torch.tensor(sigma, dtype=torch.float32) * self.num_train_timesteps)


@functools.lru_cache(maxsize=4096)  # a sampler asks for the same few levels at every step
def _nearest_sigma(n: int, shift: float, t: float) -> float:
    """The table sigma nearest t, compared in fp32 (the first on a tie), as DiNa-LRM's inferencer picks it."""
    sigmas, _ = _table(n, shift)
    return float(sigmas[int(torch.argmin((sigmas - torch.tensor(t, dtype=torch.float32)).abs()))])


@functools.cache
def _table(n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [n], timesteps [n]) float32, descending: diffusers' FlowMatchEulerDiscreteScheduler training table."""
    s = torch.linspace(1, n, n, dtype=torch.float64).to(torch.float32).flip(0) / n
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * n


__all__ = ["TimeSchedule"]
