"""RL integration: DiT-Reward as a Flow-GRPO reward function, a latent reward for samplers, GRPO advantages.

Three pieces, from the loosest coupling to the tightest:

- `dit_reward_fn` follows Flow-GRPO's reward convention (``flow_grpo/rewards.py``): it returns
  ``fn(images, prompts, metadata) -> (scores, {})`` with images a float NCHW tensor in [0, 1] (what the SD3 pipeline
  returns with ``output_type="pt"``), a uint8 NHWC array or a list of PIL images, and ``scores`` one float per image.
  `dit_reward_factory` wraps it as the ``factory(device)`` that ``multi_score``'s registry (``{name: factory}``,
  weighted by ``score_dict``) calls; it pays a VAE encode and the text encoders, like any pixel reward.
- `dit_latent_reward_fn` scores the sampler's own final latents and prompt embeddings, *before* the VAE decode:
  no decode, no re-encode, no text encoders. A GRPO group (16-24 samples of one prompt) shares one conditioning.
- `group_advantages` is Flow-GRPO's per-prompt normalisation, ``(r - mean_g) / (std_g + eps)``.

Every reward these functions return is deterministic by default: the near-clean noise of Eq. 1 is one fixed draw
per latent shape shared by every image (common random numbers, `engine.reward_noise`), so an image's reward depends
on the image and its prompt only. Reward noise would become advantage noise; ``noise="fresh"`` asks for it anyway,
``seed=`` gives image ``b`` of a call Philox stream ``b``. Reward functions loading a checkpoint share one engine per
(checkpoint, base, device, dtype, options) in the process (`engine.shared`), and text is encoded at the T5 length
the checkpoint was trained at.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from engine.api import RewardEngine
from engine.checks import resolve_device, resolve_dtype, same_device
from engine.pixel import ImageBatch
from engine.reward_noise import NoiseOption, check_noise_option
from engine.shared import ENGINE_OPTIONS, shared_engine
from engine.steps import StepRewards  # rewards while sampling: a diffusers callback_on_step_end

# Flow-GRPO's form: fn(images, prompts, metadata) -> (scores [B], details dict).
ImageRewardFn = Callable[[ImageBatch, Sequence[str], Any], tuple[np.ndarray, dict[str, Any]]]


class LatentRewardFn(Protocol):
    """``fn(latents, prompt_embeds, pooled, ...) -> rewards [B] float32`` (see `dit_latent_reward_fn`)."""

    engine: RewardEngine

    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        *,
        group_index: torch.Tensor | Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------ pixel form


def dit_reward_fn(
    engine_or_checkpoint: RewardEngine | str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    normalize: bool = False,
    noise: NoiseOption = "common",
    seed: int | None = None,
    max_side: int | None = None,
    **engine_kwargs: Any,
) -> ImageRewardFn:
    """A Flow-GRPO-style reward function: ``fn(images, prompts, metadata) -> (scores, {})``.

    Args:
        engine_or_checkpoint: a built `RewardEngine` (with a base directory attached, see `score_images`), or a
            reward checkpoint directory: ``RewardEngine.from_pretrained(checkpoint, base=base, ...)``, one engine
            per process shared by every reward fn asking for the same one (`engine.shared.shared_engine`).
        base: the local SD3/SD3.5 diffusers directory (VAE and text encoders); only with a checkpoint path.
        device, dtype, engine_kwargs: for loading a checkpoint (default device: CUDA when available).
        normalize: return ``(r - mean) / std`` with the statistics the trainer stored (BT rewards are unbounded; a
            weighted sum with other rewards in ``multi_score`` wants comparable scales).
        noise: ``"common"`` (default): every image of a size gets the same near-clean eps (`RewardEngine.
            common_noise`), so an image's score depends only on the image and its prompt, never on the call, the
            thread or its batch position: reward noise would be advantage noise, and a GRPO group is compared under
            one perturbation. ``"fresh"``: new noise every call (the same image scores slightly differently).
        seed: instead of the common draw, image ``b`` of a call uses Philox stream ``b`` of this seed.
        max_side: downscale images whose longer side exceeds this many pixels (see `engine.pixel.load_images`).

    Prompts are encoded at the T5 length the checkpoint was trained at (`RewardEngine.prompt_length`).

    Returns:
        ``fn(images, prompts, metadata=None) -> (scores, {})``: images a float NCHW tensor in [0, 1] (Flow-GRPO's
        pipeline output), a uint8 NHWC array, or a list of PIL images / paths / uint8 HWC arrays; prompts one
        string per image; metadata is ignored. ``scores`` is a float32 numpy array [B], in input order. The function
        carries the engine as ``fn.engine``.

    For Flow-GRPO's ``multi_score`` registry use `dit_reward_factory`: this function itself is not a factory
    ``multi_score`` can call.
    """
    _check_reward_args("dit_reward_fn", engine_or_checkpoint, base, dtype, noise, seed, engine_kwargs)
    if isinstance(engine_or_checkpoint, RewardEngine):
        engine = engine_or_checkpoint
    else:
        engine = shared_engine(engine_or_checkpoint, base=base, dtype=dtype, device=device, **engine_kwargs)
    engine.pixel_front_end()  # load the VAE and text encoders now: a missing base fails here, not mid-training
    pixel_noise = "fresh" if seed is not None else noise  # score_images: "fresh" + seed = seeded streams

    def reward_fn(images: ImageBatch, prompts: Sequence[str], metadata: Any = None) -> tuple[np.ndarray, dict]:
        # score_images takes Flow-GRPO's prompt tuples and numpy string arrays as they come.
        scores = engine.score_images(
            images, prompts, seed=seed, noise=pixel_noise, max_side=max_side, normalize=normalize
        )
        return scores.cpu().numpy(), {}

    reward_fn.engine = engine  # type: ignore[attr-defined]
    return reward_fn


def _check_reward_args(
    caller: str, engine_or_checkpoint: Any, base: Any, dtype: Any, noise: Any, seed: Any, engine_kwargs: dict
) -> None:
    """The argument checks `dit_reward_fn` and `dit_reward_factory` share (`caller`: the function, for messages)."""
    check_noise_option(noise, seed, default="common")
    if "device" in engine_kwargs:
        raise ValueError(
            f"{caller}: device is not an option here: Flow-GRPO's multi_score calls the factory with its device, "
            "make(device), and the engine loads there (for a reward on another device, build dit_reward_fn(..., "
            "device=...) and register a factory that returns it)"
        )
    unknown = sorted(set(engine_kwargs) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"{caller}: unexpected keyword {unknown[0]!r}; engine options are {', '.join(ENGINE_OPTIONS)}")
    resolve_dtype(dtype, torch.bfloat16)  # ("fp8" included)
    if not isinstance(engine_or_checkpoint, (RewardEngine, str, os.PathLike)):
        raise TypeError(
            f"engine_or_checkpoint must be a RewardEngine or a reward checkpoint directory, got "
            f"{type(engine_or_checkpoint).__name__}"
        )
    if isinstance(engine_or_checkpoint, RewardEngine):
        if base is not None or engine_kwargs:
            raise ValueError(
                "base and engine keywords are for loading a checkpoint path; this engine is already built and "
                "already has its base"
            )
    elif base is None:
        raise ValueError(
            f"{caller} scores images, which needs the VAE and text encoders: pass base=<SD3/SD3.5 diffusers directory>"
        )


def dit_reward_factory(
    engine_or_checkpoint: RewardEngine | str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    normalize: bool = False,
    noise: NoiseOption = "common",
    seed: int | None = None,
    max_side: int | None = None,
    **engine_kwargs: Any,
) -> Callable[[torch.device | str], ImageRewardFn]:
    """A reward-function factory for Flow-GRPO's ``multi_score``: ``make(device) -> dit_reward_fn(...)``.

    ``multi_score`` builds each registered reward as ``factory(device)`` when ``'device' in
    factory.__code__.co_varnames``, else ``factory()``. `dit_reward_fn` itself would be called with the device as
    its first argument, and a ``functools.partial`` has no ``__code__``; the plain function returned here takes
    exactly ``device``. Arguments are those of `dit_reward_fn` (but ``device``: multi_score chooses it), checked
    now (a typo fails at registration, not when training starts); nothing is loaded until ``make(device)``. Rewards
    are deterministic (common noise, see `dit_reward_fn`), and Flow-GRPO's two ``multi_score`` calls (training and
    evaluation) share one engine. With a built engine, ``device`` must be the engine's (an engine is not moved
    between devices behind its owner's back).

    In ``flow_grpo/rewards.py``, inside ``multi_score``, add one entry to its local ``score_functions`` dict::

        "dit_reward": dit_reward_factory("/ckpt/dit-reward", base="/models/sd3.5-medium", normalize=True),

    (with ``from engine.rl import dit_reward_factory`` at the top), then train with ``score_dict={"dit_reward": 1.0}``.
    """
    _check_reward_args("dit_reward_factory", engine_or_checkpoint, base, dtype, noise, seed, engine_kwargs)
    options = dict(normalize=normalize, noise=noise, seed=seed, max_side=max_side)

    def make(device: torch.device | str) -> ImageRewardFn:
        """Flow-GRPO calls this once per process with its accelerator's device."""
        if isinstance(engine_or_checkpoint, RewardEngine):
            engine = engine_or_checkpoint
            wanted = resolve_device(device)
            if not same_device(wanted, engine.device):
                raise ValueError(
                    f"device is {wanted} but the engine is on {engine.device}: build the engine on that device, or "
                    "pass the checkpoint path so that each process loads its own"
                )
            return dit_reward_fn(engine, **options)
        return dit_reward_fn(engine_or_checkpoint, base=base, device=device, dtype=dtype, **options, **engine_kwargs)

    return make


# ----------------------------------------------------------------------------------------------- latent form


def _first_of_each_group(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group labels [B] -> (first member of each distinct group [G], group id of each latent [B] in [0, G))."""
    labels, inverse = torch.unique(group, return_inverse=True)
    positions = torch.arange(group.shape[0], device=group.device)
    first = torch.full((labels.shape[0],), group.shape[0], dtype=torch.long, device=group.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first, inverse


def _group_labels(
    batch: int, device: torch.device, group_index: Any, prompts: Sequence[str] | None
) -> torch.Tensor | None:
    """GRPO group labels [B] long on `device`, from `group_index` (one label per latent) or `prompts` (one group
    per distinct prompt); None when neither is given."""
    if group_index is not None and prompts is not None:
        raise ValueError("pass group_index or prompts (which define the groups), not both")
    if prompts is not None:
        if isinstance(prompts, str) or len(prompts) != batch:
            raise ValueError(f"prompts must be {batch} strings, one per latent")
        slot: dict[str, int] = {}
        group_index = [slot.setdefault(p, len(slot)) for p in prompts]
    if group_index is None:
        return None
    if isinstance(group_index, torch.Tensor) and group_index.device != device:
        raise ValueError(f"group_index is on {group_index.device} but the latents are on {device}: move it with "
                         ".to(latents.device)")  # fmt: skip
    try:
        group = torch.as_tensor(group_index, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise TypeError(f"group_index must be {batch} integers (one group label per latent), got "
                        f"{type(group_index).__name__} {group_index!r:.60}") from None  # fmt: skip
    if group.dtype.is_floating_point or group.dtype.is_complex or group.dtype == torch.bool or group.shape != (batch,):
        raise ValueError(f"group_index must be {batch} integers (one group label per latent), got "
                         f"{group.dtype} {list(group.shape)}")  # fmt: skip
    return group.long()


def dit_latent_reward_fn(
    engine: RewardEngine,
    *,
    normalize: bool = False,
    noise: NoiseOption = "common",
    seed: int | None = None,
    grad: bool = False,
) -> LatentRewardFn:
    """The latent reward for samplers that keep their final latents and prompt embeddings (score before decoding).

    Args:
        engine: a `RewardEngine` on the sampler's device.
        normalize: ``(r - mean) / std`` with the trainer's statistics.
        noise: ``"common"`` (default): every latent of a shape gets the same eps (`RewardEngine.common_noise`), so
            a latent's reward depends on the latent and its prompt only (see `dit_reward_fn`); ``"fresh"``: new noise
            each call.
        seed: instead of the common draw, latent ``b`` uses Philox stream ``b`` of this seed.
        grad: keep the graph so rewards backpropagate to the latents (reward-gradient methods: ReFL, DRaFT).

    Runs in the engine's dtype under any ambient ``torch.autocast`` (Flow-GRPO samples under fp16 autocast).
    ``prompt_embeds`` should have the length the checkpoint was trained at (``77 + max_sequence_length``); another
    length warns once per engine (``strict_prompt_length=True``: raises).

    Returns:
        ``fn(latents, prompt_embeds, pooled, prompt_index=None, *, group_index=None, prompts=None, t=None,
        add_noise=True)`` -> rewards [B] float32 on the engine's device; ``t``/``add_noise`` as
        `RewardEngine.score` (a sampler's intermediate x_t: ``t=sigma, add_noise=False``). ``latents [B, C, H, W]``
        are transformer-space latents, i.e. the SD3 pipeline's final latents before ``/ scaling_factor +
        shift_factor`` and the VAE decode;
        ``prompt_embeds [R, L, joint_dim]`` and ``pooled [R, pooled_dim]`` are SD3's (with classifier-free guidance,
        the conditional half only). The rows R and the latents pair up in one of these ways:

        - ``prompt_index`` [B]: rows are distinct prompts, latent b uses row ``prompt_index[b]`` (the engine's
          convention; each row is conditioned once).
        - ``group_index`` [B] or ``prompts`` (B strings): R == B rows, one per latent, repeated within a group
          (Flow-GRPO's layout); the first row of each group is conditioned once and serves the whole group. Rows of
          one group must be identical (checked, one device sync, when ``engine.check_finite``).
        - none: R == B (each row conditioned separately) or R == 1 (one prompt for all).

        The function carries the engine as ``fn.engine``.
    """
    if not isinstance(engine, RewardEngine):
        raise TypeError(f"engine must be a RewardEngine, got {type(engine).__name__}")
    check_noise_option(noise, seed, default="common")

    def latent_reward_fn(
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        *,
        group_index: torch.Tensor | Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        t: float | torch.Tensor | Sequence[float] | None = None,
        add_noise: bool = True,
    ) -> torch.Tensor:
        prompt_embeds, pooled, prompt_index = distinct_prompts(
            latents, prompt_embeds, pooled, prompt_index, group_index, prompts, check_equal=engine.check_finite
        )
        cond = engine.condition(prompt_embeds, pooled)  # once per distinct prompt
        eps = engine.common_noise(latents) if add_noise and noise == "common" and seed is None else None
        return engine.score(
            latents, cond, eps, seed if add_noise else None, t=t, add_noise=add_noise, grad=grad,
            prompt_index=prompt_index, normalize=normalize,
        )  # fmt: skip

    latent_reward_fn.engine = engine  # type: ignore[attr-defined]
    return latent_reward_fn  # type: ignore[return-value]


def distinct_prompts(
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    prompt_index: torch.Tensor | Sequence[int] | None,
    group_index: torch.Tensor | Sequence[int] | None,
    prompts: Sequence[str] | None,
    *,
    check_equal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | Sequence[int] | None]:
    """The latent reward call's prompt arguments as one row per distinct prompt and a `prompt_index` per latent.

    With `group_index`/`prompts` (one label per latent; prompt rows one per latent), keeps the first row of each
    group and returns its index; `check_equal` verifies that rows labelled alike are equal (one device sync).
    Otherwise the arguments pass through (`prompt_index` indexes distinct prompt rows already)."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise TypeError("latents must be a torch.Tensor [B, C, H, W] of transformer-space latents")
    batch = latents.shape[0]
    group = _group_labels(batch, latents.device, group_index, prompts)
    if group is None:
        return prompt_embeds, pooled, prompt_index
    if prompt_index is not None:
        raise ValueError(
            "prompt_index indexes distinct prompt rows; group_index/prompts label per-latent rows: pass one"
        )
    for name, x in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] != batch:
            rows = x.shape[0] if x.ndim else "a scalar"
            raise ValueError(
                f"with group_index/prompts, {name} needs one row per latent ({batch}), got {rows}; for one "
                "row per distinct prompt use prompt_index"
            )
    first, prompt_index = _first_of_each_group(group)
    first = first.to(prompt_embeds.device)
    if check_equal and not (
        torch.equal(prompt_embeds[first][prompt_index], prompt_embeds)
        and torch.equal(pooled[first][prompt_index], pooled)
    ):
        raise ValueError("prompt embeddings differ within a group: latents labelled alike must share a prompt")
    return prompt_embeds[first], pooled[first], prompt_index


# ------------------------------------------------------------------------------------------------ advantages


def group_advantages(
    rewards: torch.Tensor | Sequence[float] | np.ndarray,
    group_index: torch.Tensor | Sequence[int] | Sequence[str] | np.ndarray,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` with each group's own statistics.

    Args:
        rewards: [B] one reward per sample.
        group_index: [B] group labels: ints, or the prompt strings themselves (Flow-GRPO groups by prompt).
        eps: added to the standard deviation (Flow-GRPO: 1e-4), so a group of equal rewards gets advantage 0.

    Returns:
        [B] advantages in rewards' floating dtype (float64 for a list of Python floats, float32 for integer
        rewards), on rewards' device. The standard deviation is the population one (ddof 0) and the arithmetic is
        fp64, as in Flow-GRPO's ``PerPromptStatTracker.update`` (``global_std=False``) on a fresh tracker.
    """
    r = torch.as_tensor(np.asarray(rewards) if not isinstance(rewards, torch.Tensor) else rewards)
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty [B] vector, got shape {list(r.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float (Flow-GRPO: 1e-4), got {type(eps).__name__} {eps!r}")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite float > 0 (Flow-GRPO: 1e-4), got {eps}")
    if r.is_floating_point() and not bool(torch.isfinite(r).all()):  # would make its whole group's advantages NaN
        bad = torch.nonzero(~torch.isfinite(r)).flatten().tolist()
        raise ValueError(f"rewards contain NaN or Inf at indices {bad}")
    if not isinstance(group_index, torch.Tensor) and len(group_index) and isinstance(group_index[0], str):
        slot: dict[str, int] = {}
        group_index = [slot.setdefault(p, len(slot)) for p in group_index]
    group = torch.as_tensor(group_index, device=r.device)
    if group.shape != r.shape or group.dtype.is_floating_point or group.dtype == torch.bool:
        raise ValueError(f"group_index must be {r.shape[0]} integer labels or strings, got {group.dtype} "
                         f"{list(group.shape)}")  # fmt: skip
    _, inverse = torch.unique(group, return_inverse=True)
    x = r.double()
    count = torch.bincount(inverse).double()
    mean = torch.zeros_like(count).index_add_(0, inverse, x) / count
    centred = x - mean[inverse]
    std = (torch.zeros_like(count).index_add_(0, inverse, centred**2) / count).sqrt()
    out_dtype = r.dtype if r.is_floating_point() else torch.float32
    return (centred / (std[inverse] + eps)).to(out_dtype)


__all__ = [
    "distinct_prompts",
    "ImageRewardFn",
    "LatentRewardFn",
    "StepRewards",
    "dit_latent_reward_fn",
    "dit_reward_factory",
    "dit_reward_fn",
    "group_advantages",
]
