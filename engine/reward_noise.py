"""The near-clean noise of rewards handed to an RL loop: one common draw per latent shape, or fresh noise.

Eq. 1 perturbs a latent with ``eps`` before scoring, so a reward is a random variable unless ``eps`` is fixed. In
an RL loop reward noise becomes advantage noise: GRPO normalises rewards within a prompt's group, and whatever part
of a reward comes from ``eps`` moves the advantages without anything the policy could learn from. The reward
functions of `engine.rl` therefore default to **common random numbers**: one ``eps`` per latent shape ``[C, H, W]``,
drawn once from `COMMON_NOISE_SEED` with the engine's own Philox noise (stream 0, i.e. image 0 of
``score(..., seed=COMMON_NOISE_SEED)``) and shared by every image of that shape. An image's reward is then a
function of the image and its prompt alone (not of the call, the thread, or its position in the batch), and the
images of a GRPO group are compared under the same perturbation.

``noise="fresh"`` draws new noise every call instead (rewards then average the perturbation out over many calls);
an explicit ``seed`` gives image ``b`` of a call Philox stream ``b``.
"""

from __future__ import annotations

from typing import Literal

import torch

from engine.checks import check_seed
from engine.lru import LRUCache
from kernels.noise import noise_ref

# The documented draw every default RL reward uses: Philox key 0, stream 0.
COMMON_NOISE_SEED = 0
# Per cache: 64 latent shapes of SD3.5 at 1024² (16 x 128 x 128 fp32 = 1 MiB each).
COMMON_NOISE_CACHE_BYTES = 64 << 20

NoiseOption = Literal["common", "fresh"]
NOISE_OPTIONS = ("common", "fresh")


def check_noise_option(noise: str, seed: int | None, default: NoiseOption) -> None:
    """`noise` is "common" or "fresh" and `seed` an int or None. A seed replaces the caller's `default` noise;
    with another noise asked for explicitly, the two contradict each other."""
    if noise not in NOISE_OPTIONS:
        raise ValueError(
            f"noise must be 'common' (one fixed draw per latent shape: deterministic rewards) or 'fresh' (new noise "
            f"every call), got {noise!r}"
        )
    check_seed(seed)
    if seed is not None and noise != default:
        raise ValueError(f"seed= fixes the noise per image (stream b for image b) and noise={noise!r} asks for "
                         "other noise: pass one of them")  # fmt: skip


class CommonNoise:
    """Common random numbers for near-clean noise: ``draw(latents)`` is the same ``eps [C, H, W]`` for every image
    of a shape, expanded over the batch. Draws are cached per (shape, device, dtype) in a thread-safe LRU bounded
    by `COMMON_NOISE_CACHE_BYTES`; a draw costs one Philox pass, and concurrent misses compute the same values."""

    def __init__(self, seed: int = COMMON_NOISE_SEED, cache_bytes: int = COMMON_NOISE_CACHE_BYTES) -> None:
        check_seed(seed)
        self.seed = seed
        self._cache: LRUCache[tuple, tuple[torch.Tensor, int]] = LRUCache(cache_bytes, lambda e: e[0].nbytes)

    def draw(self, latents: torch.Tensor) -> torch.Tensor:
        """``eps [B, C, H, W]`` for ``latents [B, C, H, W]``, on their device, float32 (float64 for float64 latents,
        the precision the near-clean step computes in). Every row is the same read-only view of the cached draw:
        clone before editing it (an edit is detected and the draw recomputed, never served)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or not latents.is_floating_point():
            got = f"{latents.dtype} {list(latents.shape)}" if isinstance(latents, torch.Tensor) else type(latents)
            raise TypeError(f"latents must be a floating-point torch.Tensor [B, C, H, W], got {got}")
        shape, device = tuple(latents.shape[1:]), latents.device
        dtype = torch.promote_types(latents.dtype, torch.float32)
        key = (shape, device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0]._version != cached[1]:  # (views share their base's version counter)
            eps = noise_ref((1, *shape), self.seed, device=device)[0].to(dtype)  # [C, H, W]
            cached = (eps, eps._version)
            self._cache.put(key, cached)
        return cached[0].expand(latents.shape[0], *shape)

    def __len__(self) -> int:
        return len(self._cache)
