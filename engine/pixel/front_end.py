"""Both encoders of one SD3/SD3.5 base, and images paired with their prompts, grouped by size for the engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from engine.checks import check_seed, resolve_device
from engine.pixel.images import ImageBatch
from engine.pixel.prompts import DEFAULT_CACHE_BYTES, PromptEncoder
from engine.pixel.vae import ImageEncoder
from engine.prompt_length import SD3_T5_TOKENS
from kernels.noise import noise_ref


class PreparedGroup(NamedTuple):
    """Images of one resized size with the distinct prompts they use, ready for the engine.

    Prompts are kept distinct (GRPO scores many images per prompt, and the engine's conditioning is per-prompt
    work): image ``j`` of the group uses prompt ``prompt_index[j]``, i.e. ``engine.features(latents, (prompt_embeds,
    pooled), prompt_index=prompt_index)``.
    """

    index: torch.Tensor  # [b] long: positions in the caller's images/prompts lists
    latents: torch.Tensor  # [b, C, h, w] transformer-space latents
    prompt_embeds: torch.Tensor  # [p, 77 + T5_len, joint_dim], p <= b distinct prompts
    pooled: torch.Tensor  # [p, pooled_dim]
    prompt_index: torch.Tensor  # [b] long in [0, p)
    noise: torch.Tensor | None = None  # [b, C, h, w] float32: noise stream index[j] of the seed, when one is given


class PixelFrontEnd:
    """Prompt and image encoders of one SD3/SD3.5 base: what ``score_images(images, prompts)`` runs before scoring."""

    def __init__(self, prompt_encoder: PromptEncoder, image_encoder: ImageEncoder) -> None:
        self.prompt_encoder = prompt_encoder
        self.image_encoder = image_encoder

    @classmethod
    def from_pretrained(
        cls,
        base_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = SD3_T5_TOKENS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        text_encoders_device: torch.device | str | None = None,
        vae_batch_size: int = 8,
    ) -> PixelFrontEnd:
        """Load both halves from a local SD3/SD3.5 diffusers directory.

        ``text_encoders_device="cpu"`` keeps the ~11 GB of text encoders off the GPU (prompts then encode slowly,
        but the cache makes repeats free); outputs still land on ``device``.
        """
        device = resolve_device(device)
        prompts = PromptEncoder.from_pretrained(
            base_dir, device=device, dtype=dtype, max_sequence_length=max_sequence_length, cache_bytes=cache_bytes,
            encoders_device=text_encoders_device,
        )  # fmt: skip
        images = ImageEncoder.from_pretrained(base_dir, device=device, dtype=dtype, batch_size=vae_batch_size)
        return cls(prompts, images)

    def encode_prompts(
        self, prompts: str | Sequence[str], progress: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, 77 + T5_len, joint_dim], pooled [B, pooled_dim])``, through the cache."""
        return self.prompt_encoder(prompts, progress=progress)

    def encode_images(
        self, images: ImageBatch, max_side: int | None = None, progress: bool | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(index [b], latents [b, C, h, w]), ...]`` grouped by resized size (see `ImageEncoder.encode`)."""
        return self.image_encoder.encode(images, max_side=max_side, progress=progress)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer-space latents ``[B, C, h, w]`` -> float32 images ``[B, 3, 8h, 8w]`` in [0, 1]."""
        return self.image_encoder.decode(latents)

    def release_text_encoders(self) -> None:
        """Free the text encoders; cached prompts stay servable (see `PromptEncoder.release_encoders`)."""
        self.prompt_encoder.release_encoders()

    def prepare(
        self,
        images: ImageBatch,
        prompts: Sequence[str],
        max_side: int | None = None,
        progress: bool | None = None,
        seed: int | None = None,
    ) -> list[PreparedGroup]:
        """Pair image ``i`` with ``prompts[i]``; one `PreparedGroup` per resized image size.

        Each distinct prompt is encoded once, before any VAE work (a bad prompt fails fast). Scores computed per
        group go back to input order with ``scores[group.index] = group_scores``. With ``seed``, image ``i`` gets
        noise stream ``i`` of the call, whatever the sizes of the others (its reward does not depend on them).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image (got a single str)")
        check_seed(seed)
        # Flow-GRPO hands over tuples from its DataLoader; numpy string arrays are also seen in the wild.
        prompts = [str(p) if isinstance(p, np.str_) else p for p in prompts]
        pixels = self.image_encoder.load(images, max_side=max_side)
        if len(prompts) != len(pixels):
            raise ValueError(f"got {len(pixels)} images but {len(prompts)} prompts: pass one prompt per image")
        distinct = list(dict.fromkeys(prompts))
        embeds, pooled = self.prompt_encoder(distinct, progress=progress)
        slot = {prompt: i for i, prompt in enumerate(distinct)}
        prompt_of_image = [slot[p] for p in prompts]  # [N] into distinct
        groups = []
        for index, latents in self.image_encoder.encode_loaded(pixels, progress):
            slots = [prompt_of_image[i] for i in index.tolist()]
            used = sorted(set(slots))  # the group's distinct prompts, in first-encoded order
            position = {u: k for k, u in enumerate(used)}
            prompt_index = torch.tensor([position[u] for u in slots], device=embeds.device)
            rows = torch.tensor(used, device=embeds.device)
            noise = None
            if seed is not None:
                noise = noise_ref(latents.shape, seed, streams=index, device=latents.device)
            groups.append(PreparedGroup(index, latents, embeds[rows], pooled[rows], prompt_index, noise))
        return groups
