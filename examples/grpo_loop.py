"""A GRPO loop on the latent reward: sample latents per prompt, score each group before any decoding, normalise
rewards within groups, take a clipped policy-gradient step. Runs in seconds on a CPU with the tiny random base.

The policy is a stand-in for the flow-matching sampler: a diagonal Gaussian over latents with one learnable mean per
prompt. What carries over to Flow-GRPO unchanged is the reward side: prompts encoded once, the sampler's final
latents and (per-sample, repeated) prompt embeddings handed to `dit_latent_reward_fn` with the group labels, so each
group of G latents shares one conditioning, then `group_advantages`. With random reward weights the reward has no
meaning; the loop shows that it rises under optimisation and that every piece fits together.

    python examples/grpo_loop.py [--steps 12] [--group-size 8] [--base DIR] [--device cuda]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from pydantic import Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from engine import RewardEngine  # noqa: E402
from engine.rl import dit_latent_reward_fn, group_advantages  # noqa: E402
from engine.schema import Schema, parse_cli  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car on a street at night", "two dogs running on the beach"]
LATENT_HW = (8, 8)  # 64x64 images: the loop is about the plumbing, not resolution
POLICY_STD = 0.5  # fixed exploration noise of the Gaussian policy
LEARNING_RATE = 0.05  # Adam on the per-prompt means; large enough to see the reward move within a dozen steps
PPO_EPOCHS = 2  # updates per sampled batch, as Flow-GRPO reuses each rollout batch
CLIP_RANGE = 0.2  # PPO ratio clip (Flow-GRPO's default is 1e-4 on per-step ratios; ours is one ratio per sample)


class GaussianPolicy(torch.nn.Module):
    """z ~ N(mu_p, std^2 I) for prompt p; a stand-in for the sampler (its per-step log-probs in Flow-GRPO)."""

    def __init__(self, num_prompts: int, shape: tuple[int, ...], std: float):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(num_prompts, *shape))
        self.std = std

    def sample(self, group: torch.Tensor) -> torch.Tensor:
        """group [B] prompt ids -> latents [B, C, H, W]."""
        return self.mean[group] + self.std * torch.randn_like(self.mean[group])

    def log_prob(self, z: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """[B], up to a constant; divided by the dimension so that ratios stay O(1) per step."""
        return -((z - self.mean[group]) ** 2).flatten(1).mean(1) / (2 * self.std**2)


class LoopArgs(Schema):
    """The command line of this example."""

    steps: int = Field(12, ge=1, le=100_000, description="GRPO steps")
    group_size: int = Field(8, ge=2, le=4096, description="samples per prompt (Flow-GRPO: 16-24)")
    base: str | None = Field(None, min_length=1, description="SD3/SD3.5 diffusers dir (default: the tiny random base)")
    device: str = Field("cpu", min_length=1, description="torch device")


def main(argv: list[str] | None = None) -> list[float]:
    """Run the loop; returns the mean reward of each step."""
    args = parse_cli(LoopArgs, argv, "python examples/grpo_loop.py", __doc__.split("\n\n")[0])
    torch.manual_seed(0)

    if args.base is None:
        from bench.tiny_base import default_tiny_base

        args.base = str(default_tiny_base())
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    engine = RewardEngine.from_base(args.base, dtype=dtype, device=args.device)  # kernels: $DITREWARD_KERNELS
    # Prompts once per run: the sampler needs these embeddings anyway, and the reward reuses them.
    embeds, pooled = engine.pixel_front_end().encode_prompts(PROMPTS)  # [P, L, joint_dim], [P, pooled_dim]
    engine.pixel.release_text_encoders()  # the loop never encodes again
    # Default noise: one common near-clean draw per latent shape, so a latent's reward depends on the latent and its
    # prompt only, and the advantages carry no reward noise.
    reward_fn = dit_latent_reward_fn(engine)

    group = torch.arange(len(PROMPTS), device=args.device).repeat_interleave(args.group_size)  # [B]
    policy = GaussianPolicy(len(PROMPTS), (engine.config.in_channels, *LATENT_HW), POLICY_STD).to(args.device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=LEARNING_RATE)
    history = []
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.no_grad():
            z = policy.sample(group)
            log_prob_old = policy.log_prob(z, group)
        # Flow-GRPO's layout: one embedding row per sample; group_index lets a group share one conditioning.
        rewards = reward_fn(z.to(dtype), embeds[group], pooled[group], group_index=group)  # [B] float32
        advantages = group_advantages(rewards, group)  # [B]
        for _ in range(PPO_EPOCHS):
            ratio = torch.exp(policy.log_prob(z, group) - log_prob_old)
            clipped = ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)
            loss = -torch.minimum(advantages * ratio, advantages * clipped).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        per_prompt = rewards.view(len(PROMPTS), args.group_size).mean(1)
        history.append(float(rewards.mean()))  # .item(): one sync per step, for the log
        print(
            f"step {step:3d}  reward {history[-1]:+.4f}  per prompt "
            + " ".join(f"{r:+.3f}" for r in per_prompt.tolist())
            + f"  loss {float(loss.detach()):+.4f}  {1e3 * (time.perf_counter() - start):.0f} ms"
        )
    assert all(math.isfinite(r) for r in history)
    return history


if __name__ == "__main__":
    main()
