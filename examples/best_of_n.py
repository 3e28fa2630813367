"""Best-of-N with early pruning: sample N candidates for a prompt, drop the worst ones part-way by the noise-aware
reward of their intermediate x_t, finish only the survivors, and compare with plain best-of-N on the same seeds.

The sampling loop is SD3's own (what `StableDiffusion3Pipeline.__call__` runs), written out so that the batch can
shrink: the pipeline's transformer with classifier-free guidance, the pipeline's FlowMatch-Euler scheduler. After
step i the candidates are x at sigma_{i+1} of the run's table; the reward scores them there as the x_t they are
(``t = sigma, add_noise=False``), and at a pruning step only the best ``--keep`` fraction goes on. The final latents
(sigma 0) are scored as an RL reward scores them: the checkpoint's t, the engine's common noise.

What it prints: the transformer candidate-steps each run takes (one candidate advanced one step; with CFG that is
two rows of the transformer's batch) and how many pruning saved, each run's pick and its final reward, and the
per-(prompt, t) conditioning cache (`Conditioning.hits`/`misses`) through each 28-step run. Both runs score the
survivors at every step (the reward trace a sampler would log) against ONE Conditioning of the prompt: the first run
makes each timestep's adaLN vectors once (a miss per new t), the second finds them all (hits). With the tiny random
base the reward has no meaning; the example shows the mechanics and their arithmetic.

    python examples/best_of_n.py [--candidates 16] [--steps 28] [--prune-at 6 13] [--keep 0.5] [--base DIR]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from pydantic import Field, model_validator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from engine import RewardEngine  # noqa: E402
from engine.model.conditioning import Conditioning  # noqa: E402
from engine.schema import Schema, invalid, parse_cli  # noqa: E402

GUIDANCE_SCALE = 7.0  # the SD3 pipeline's default CFG scale
PIXELS = 64  # 64x64 images (8x8 latents): the example is about the loop, not resolution


class BestOfNArgs(Schema):
    """The command line of this example."""

    prompt: str = Field("a red fox sitting in the snow", min_length=1, description="the prompt")
    candidates: int = Field(16, ge=1, le=4096, description="N: candidates sampled")
    steps: int = Field(28, ge=1, le=1000, description="sampling steps (SD3.5: 28)")
    prune_at: list[int] = Field([6, 13], description="steps after which the worst candidates are dropped")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="fraction of the candidates kept at each pruning step")
    seed: int = Field(0, ge=0, lt=2**62, description="candidate i starts from the noise of seed + i")
    base: str | None = Field(None, min_length=1, description="SD3/SD3.5 diffusers dir (default: the tiny random base)")
    device: str = Field("cpu", min_length=1, description="torch device")

    @model_validator(mode="after")
    def _prune_inside_the_run(self) -> BestOfNArgs:
        late = [s for s in self.prune_at if not 0 <= s < self.steps - 1]
        if late:  # after the last step there is nothing left to save
            raise invalid("prune_at", late, f"steps in [0, {self.steps - 2}] (--steps {self.steps})")
        return self


def sample(pipe, engine: RewardEngine, cond: Conditioning, prompts: tuple, noise: torch.Tensor, args, prune: bool):
    """One run over `noise` [N, C, h, w]: (final rewards of the survivors [n], their candidate ids [n],
    transformer candidate-steps, reward trace: per step the survivors' mean reward)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(args.steps, device=noise.device)
    embeds, pooled, negative, negative_pooled = prompts
    x, ids, candidate_steps, trace = noise, torch.arange(noise.shape[0], device=noise.device), 0, []
    for i, t in enumerate(scheduler.timesteps):
        n = x.shape[0]
        with torch.no_grad():  # classifier-free guidance, as the pipeline: [negative; positive] in one batch
            velocity = pipe.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=t.expand(2 * n),
                encoder_hidden_states=torch.cat([negative.expand(n, -1, -1), embeds.expand(n, -1, -1)]),
                pooled_projections=torch.cat([negative_pooled.expand(n, -1), pooled.expand(n, -1)]),
                return_dict=False,
            )[0]
        uncond, text = velocity.chunk(2)
        x = scheduler.step(uncond + GUIDANCE_SCALE * (text - uncond), t, x, return_dict=False)[0]
        candidate_steps += n
        sigma = float(scheduler.sigmas[scheduler.step_index])  # the level x is at now (0: the clean latent)
        one_prompt = torch.zeros(n, dtype=torch.long, device=x.device)
        if sigma > 0:
            rewards = engine.score(x, cond, t=sigma, add_noise=False, prompt_index=one_prompt)
        else:
            rewards = engine.score(x, cond, engine.common_noise(x), prompt_index=one_prompt)
        trace.append(float(rewards.mean()))
        if prune and i in args.prune_at and sigma > 0:
            best = torch.argsort(rewards, descending=True)[: max(1, math.ceil(args.keep * n))]
            x, ids = x[best], ids[best]
    return rewards, ids, candidate_steps, trace


def main(argv: list[str] | None = None) -> dict:
    """Run plain and pruned best-of-N on the same seeds; returns their numbers (see the module docstring)."""
    args = parse_cli(BestOfNArgs, argv, "python examples/best_of_n.py", __doc__.split("\n\n")[0])
    if args.base is None:
        from bench.tiny_base import default_tiny_base

        args.base = str(default_tiny_base())
    from diffusers import StableDiffusion3Pipeline

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    pipe = StableDiffusion3Pipeline.from_pretrained(args.base, torch_dtype=dtype).to(args.device)
    torch.manual_seed(0)  # the fresh reward head's initialisation: one reward whatever the other arguments
    engine = RewardEngine.from_base(args.base, dtype=dtype, device=args.device)  # kernels: $DITREWARD_KERNELS
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            args.prompt, None, None, device=args.device, do_classifier_free_guidance=True
        )
    cond = engine.condition(embeds, pooled)  # once for the prompt; each timestep's part is made on first use
    channels, side = pipe.transformer.config.in_channels, PIXELS // pipe.vae_scale_factor
    noise = torch.cat([
        torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(args.seed + i))
        for i in range(args.candidates)
    ]).to(args.device, dtype)  # fmt: skip
    prompts = (embeds, pooled, negative, negative_pooled)

    out: dict = {}
    for name, prune in (("plain", False), ("pruned", True)):
        hits, misses = cond.hits, cond.misses
        rewards, ids, candidate_steps, trace = sample(pipe, engine, cond, prompts, noise, args, prune)
        best = int(torch.argmax(rewards))
        hits, misses = cond.hits - hits, cond.misses - misses
        out[name] = {
            "candidate_steps": candidate_steps,
            "pick": int(ids[best]),
            "reward": float(rewards[best]),
            "final_rewards": dict(zip(ids.tolist(), rewards.tolist(), strict=True)),
            "cache_hits": hits,
            "cache_misses": misses,
            "trace": trace,
        }
        print(f"{name:6s}  candidate-steps {candidate_steps:5d}  pick #{ids[best]:<3d} reward {rewards[best]:+.5f}  "
              f"conditioning cache {hits}/{hits + misses} hits ({100 * hits / (hits + misses):.0f}%)")  # fmt: skip
    plain, pruned = out["plain"], out["pruned"]
    saved = plain["candidate_steps"] - pruned["candidate_steps"]
    same = plain["final_rewards"][pruned["pick"]]
    total = plain["candidate_steps"]
    print(f"pruning at steps {args.prune_at} keeping {args.keep:g}: {saved} of {total} transformer candidate-steps "
          f"saved ({100 * saved / total:.0f}%); pruned pick #{pruned['pick']} scored {same:+.5f} in the plain run; "
          f"plain best #{plain['pick']} "
          f"{'kept' if plain['pick'] in pruned['final_rewards'] else 'dropped'} by pruning")  # fmt: skip
    out["saved"] = saved
    return out


if __name__ == "__main__":
    main()
