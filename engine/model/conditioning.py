"""What a prompt contributes to the forward once t is fixed: the projected text tokens and every block's adaLN
vectors. `MMDiTReward.condition` makes one; `MMDiTReward.forward` reuses it for every latent scored against it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.checks import first_nonfinite


@dataclass
class Conditioning:
    """Everything that depends on the prompt alone (t fixed): projected text tokens and every block's adaLN vectors.

    Built by `MMDiTReward.condition`; leading dimension P = number of prompts. `select(index)` maps it onto a batch of
    latents (one prompt serving a GRPO group): two gathers, whatever the depth, because the vectors are packed."""

    context: torch.Tensor  # [P, L, D] context_embedder(prompt_embeds)
    modulation: torch.Tensor  # [P, M, D] all blocks' (shift, scale, gate) vectors, block after block
    t: float
    # Who made it: (the engine's identity token, the version of its prompt-path weights then). None for one built
    # by hand, which the engine accepts after checking it is finite; a Conditioning from another engine, or from
    # this one before its weights changed, is refused (same shapes, different numbers).
    origin: tuple[object, int] | None = None

    @property
    def num_prompts(self) -> int:
        return self.context.shape[0]

    def check_finite(self) -> None:
        """ValueError if any vector is NaN/Inf (one device sync). Not run on construction: CUDA graph capture builds
        Conditionings of static buffers, where a sync is not allowed."""
        name = first_nonfinite({"context": self.context, "modulation": self.modulation})
        if name is not None:
            raise ValueError(
                f"Conditioning.{name} contains NaN or Inf values: made by hand with them, or the prompt "
                "embeddings overflowed the prompt path (check prompt_embeds/pooled for huge values)"
            )

    def select(self, index: torch.Tensor) -> Conditioning:
        return replace(
            self, context=self.context.index_select(0, index), modulation=self.modulation.index_select(0, index)
        )
