"""The model, as the paper writes it (DESIGN.md Eq. 1-4): embeddings, the block, the slimmed MMDiT with its one
forward, and the per-prompt `Conditioning`."""

from engine.model.conditioning import Conditioning
from engine.model.mmdit import MMDiTReward, diffusers_state_dict

__all__ = ["Conditioning", "MMDiTReward", "diffusers_state_dict"]
