"""The noise level of each training pair (`TrainConfig.t_sampling`).

``fixed`` trains every pair at ``t`` (DiT-Reward, Eq. 1). The other rules draw one t per pair, shared by its winner
and loser (DiNa-LRM's noise-aware training), from a distribution u on [0, 1] mapped to [t_min, t_max]:
t = t_min + (t_max - t_min) u, with u ~ U(0, 1) (``uniform``), sigmoid(N(mean, std)) (``logit_normal``, SD3's
timestep density) or Beta(a, b) (``beta``). The draw is a pure function of (seed, step): pair k of step s's global
batch takes value k of a generator seeded with (seed, s), so a resumed run draws the same levels, whatever the number
of processes or micro-batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

T_SAMPLINGS = ("fixed", "uniform", "logit_normal", "beta")
_STREAM = 0x7E5  # keeps these draws apart from any other generator seeded with (seed, step)


def pair_levels(cfg: Any, step: int) -> torch.Tensor | None:
    """t [cfg.batch_size] float32 of optimizer step `step`'s global batch (pair k of `BucketSampler.batch(step)` ->
    t[k]); None for ``fixed`` (every pair at cfg.t). `cfg`: a `TrainConfig`."""
    if cfg.t_sampling == "fixed":
        return None
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, step, _STREAM])))
    n = cfg.batch_size
    if cfg.t_sampling == "uniform":
        u = rng.random(n)
    elif cfg.t_sampling == "logit_normal":
        u = 1.0 / (1.0 + np.exp(-rng.normal(cfg.t_logit_mean, cfg.t_logit_std, n)))
    else:
        u = rng.beta(cfg.t_beta_a, cfg.t_beta_b, n)
    t = torch.tensor(cfg.t_min + (cfg.t_max - cfg.t_min) * u, dtype=torch.float32)
    return t.clamp(cfg.t_min, cfg.t_max)  # (float32 rounding stays inside the configured range)


__all__ = ["T_SAMPLINGS", "pair_levels"]
