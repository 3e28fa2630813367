"""Rewards while sampling: a diffusers ``callback_on_step_end`` that scores a sampler's intermediate latents.

`StepRewards(engine, every=k, guidance=None)` is passed to `StableDiffusion3Pipeline.__call__`::

    steps = StepRewards(engine, every=4)
    pipe(prompt, callback_on_step_end=steps, callback_on_step_end_tensor_inputs=StepRewards.tensor_inputs)
    steps.trace  # [scored steps, B] float32: the noise-aware reward of x_t along the trajectory

What the callback sees. The SD3 pipeline calls it after ``scheduler.step`` of step ``i``: its ``latents`` are the
new state x at ``sigma = scheduler.sigmas[scheduler.step_index]`` (the step index has advanced: sigma_{i+1} of the
run's table, shift and all), already in the transformer's space, the engine's own latent space. Such an x is scored
as the x_t it is (``t = sigma, add_noise=False``: the generator's timestep 1000 sigma is the one the reward's time
embedding reads). The last step leaves sigma 0, the clean latent: it is scored as a clean latent is everywhere else,
at the checkpoint's t with the engine's common noise (what `engine.rl.dit_latent_reward_fn` returns for the final
latents). The prompt is the pipeline's own ``prompt_embeds``/``pooled_prompt_embeds``; with classifier-free guidance
the pipeline holds [negative; positive] and the conditional half is used. The prompts are conditioned once per run;
each step's noise level is made once per prompt (`Conditioning.hits`/`misses` count it).

Reward guidance (``guidance=lam``): on each scored step x <- x + lam * grad_x r(x, sigma), the gradient through the
engine's differentiable path (``grad=True``). What is guided is the state the callback receives: x_{i+1}, after the
CFG-combined velocity's Euler step, so the guidance term adds to the classifier-free-guided update and the next step
starts from the guided state; on the last step (sigma 0) it is the clean reward's gradient on the output latent.
The trace holds the reward of x before its guidance step. A reward used this way must be noise-aware (trained or
valid at the sigmas it is applied at); ``guidance=0.0`` runs the same path and adds zero.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from engine.api import RewardEngine
from engine.model.conditioning import Conditioning


class StepRewards:
    """A ``callback_on_step_end`` for diffusers' `StableDiffusion3Pipeline` (see the module docstring).

    Args:
        engine: the latent reward (on the pipeline's device).
        every: score steps i with (i + 1) % every == 0, and always the last one.
        guidance: None (score only), or lam >= 0: reward guidance x += lam * grad_x r on each scored step.

    After a run: `trace` [scored steps, B] float32 (CPU), `steps` (the step indices scored), `sigmas` (the sigma of
    each scored state; 0.0: the clean latent), `cond` (the run's Conditioning, with its cache counters). A new run
    (step 0, or a step not after the last one recorded) starts a new trace."""

    tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]

    def __init__(self, engine: RewardEngine, every: int = 1, guidance: float | None = None):
        if not isinstance(engine, RewardEngine):
            raise TypeError(f"engine must be a RewardEngine, got {type(engine).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (score every k-th step), got {every!r}")
        if guidance is not None and (
            isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not 0 <= guidance < float("inf")
        ):
            raise ValueError(
                f"guidance must be None or a finite float >= 0 (the reward-gradient scale), got {guidance!r}"
            )
        self.engine, self.every, self.guidance = engine, every, None if guidance is None else float(guidance)
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self._rows: list[torch.Tensor] = []
        self.cond: Conditioning | None = None

    @property
    def trace(self) -> torch.Tensor:
        """[scored steps, B] float32 on the CPU (empty [0, 0] before a run)."""
        return torch.stack(self._rows) if self._rows else torch.empty(0, 0)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, torch.Tensor]) -> dict:
        missing = [k for k in self.tensor_inputs if k not in callback_kwargs]
        if missing:
            raise ValueError(
                f"StepRewards needs {missing} from the pipeline: call it with "
                "callback_on_step_end_tensor_inputs=StepRewards.tensor_inputs"
            )
        if step == 0 or (self.steps and step <= self.steps[-1]) or self.cond is None:
            self._start(pipe, callback_kwargs)
        last = step == pipe.num_timesteps - 1
        if (step + 1) % self.every and not last:
            return callback_kwargs
        x = callback_kwargs["latents"]
        sigma = float(pipe.scheduler.sigmas[pipe.scheduler.step_index])
        reward, x = self._score(x, sigma)
        self.steps.append(step)
        self.sigmas.append(sigma)
        self._rows.append(reward.detach().float().cpu())
        return {**callback_kwargs, "latents": x}

    def _start(self, pipe: Any, callback_kwargs: dict[str, torch.Tensor]) -> None:
        """A new run: empty trace, its prompts conditioned (the conditional half under CFG)."""
        self.steps, self.sigmas, self._rows = [], [], []
        embeds, pooled = callback_kwargs["prompt_embeds"], callback_kwargs["pooled_prompt_embeds"]
        batch = callback_kwargs["latents"].shape[0]
        if pipe.do_classifier_free_guidance:  # the pipeline holds [negative; positive]
            if embeds.shape[0] != 2 * batch:
                raise ValueError(f"with classifier-free guidance the pipeline's prompt_embeds should hold 2 x {batch} "
                                 f"rows (negative; positive), got {embeds.shape[0]}")  # fmt: skip
            embeds, pooled = embeds[batch:], pooled[batch:]
        self.cond = self.engine.condition(embeds, pooled)

    def _score(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward [B] of x, x after guidance). sigma 0 is the clean latent (the checkpoint's t, common noise)."""
        engine = self.engine
        clean = sigma == 0.0
        options: dict[str, Any] = {"noise": engine.common_noise(x)} if clean else {"t": sigma, "add_noise": False}
        if self.guidance is None:
            return engine.score(x, self.cond, **options), x
        with torch.enable_grad():  # (the pipeline samples under no_grad)
            leaf = x.detach().requires_grad_(True)
            reward = engine.score(leaf, self.cond, grad=True, **options)
            (gradient,) = torch.autograd.grad(reward.sum(), leaf)  # rows are independent: row b's gradient its own
        return reward.detach(), x + self.guidance * gradient.to(x.dtype)


__all__ = ["StepRewards"]
