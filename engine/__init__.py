"""DiT-Reward: an SD3/SD3.5 MMDiT turned into a latent reward model. Start with `RewardEngine`."""

from engine.api import RewardEngine
from engine.config import PRESETS, BackboneConfig, RewardConfig
from engine.model.conditioning import Conditioning

__all__ = ["PRESETS", "BackboneConfig", "Conditioning", "RewardConfig", "RewardEngine"]
