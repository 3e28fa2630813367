"""The SD3 VAE between pixels in [0, 1] and transformer-space latents."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.checks import resolve_device
from engine.pixel.common import progress_bar, read_model_json
from engine.pixel.images import ImageBatch, load_images


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE runs in fp32 when asked for fp16 and its config says ``force_upcast``, else in ``dtype``."""
    return torch.float32 if dtype == torch.float16 and bool(force_upcast) else dtype


class ImageEncoder:
    """The SD3 VAE between pixels in [0, 1] and transformer-space latents ``(z - shift) * scale``.

    ``dtype`` is the latents' dtype and the VAE's compute dtype, except that an fp16 request keeps the VAE in fp32
    when its config says ``force_upcast`` (SD3's VAE overflows in fp16, as diffusers' pipelines also work around).
    ``batch_size`` bounds images per VAE call: encoder activations are ~0.5 GB per 1024² image in fp32.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        patch_size: int = 2,
        pos_embed_max_size: int | None = None,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype(dtype, getattr(vae.config, "force_upcast", False))
        # Cast only when needed: diffusers warns on any dtype `.to()` of a model it loaded.
        if vae.dtype != self.vae_dtype:
            vae = vae.to(dtype=self.vae_dtype)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        # SD3's VAE has both; a missing shift (SD1/SDXL VAEs) means none.
        self.shift = float(vae.config.shift_factor or 0.0)
        self.scale = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor * patch_size
        self.max_image_side = None if pos_embed_max_size is None else pos_embed_max_size * self.size_multiple
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        base_dir: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> ImageEncoder:
        """The VAE of a local SD3/SD3.5 diffusers directory; patch size and size limit from its transformer."""
        from diffusers import AutoencoderKL

        base = Path(base_dir)
        transformer = read_model_json(base / "transformer" / "config.json")
        upcast = read_model_json(base / "vae" / "config.json").get("force_upcast", False)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=vae_dtype(dtype, upcast))
        return cls(
            vae, device=device, dtype=dtype, patch_size=transformer.get("patch_size", 2),
            pos_embed_max_size=transformer.get("pos_embed_max_size"), batch_size=batch_size,
        )  # fmt: skip

    def load(self, images: ImageBatch, max_side: int | None = None) -> list[torch.Tensor]:
        """`load_images` with this backbone's size multiple and limit."""
        return load_images(
            images, size_multiple=self.size_multiple, max_side=max_side, max_image_side=self.max_image_side
        )

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] (H, W multiples of `size_multiple`) -> latents ``[B, C, H/8, W/8]``.

        The posterior mean, not a sample: a reward must be deterministic for a given image.
        """
        x = pixels.to(self.device, self.vae_dtype) * 2.0 - 1.0
        z = self.vae.encode(x).latent_dist.mean
        return ((z - self.shift) * self.scale).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer-space latents ``[B, C, h, w]`` -> float32 images ``[B, 3, 8h, 8w]`` in [0, 1]."""
        z = latents.to(self.device, self.vae_dtype) / self.scale + self.shift
        images = self.vae.decode(z).sample
        return (images.float() / 2 + 0.5).clamp_(0.0, 1.0)

    def encode(
        self, images: ImageBatch, max_side: int | None = None, progress: bool | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images -> ``[(index [b] long, latents [b, C, h, w]), ...]``, one entry per resized size, in order of
        first appearance; ``index`` gives each latent's position in ``images`` (on ``device``)."""
        return list(self.encode_loaded(self.load(images, max_side), progress))

    def encode_loaded(
        self, pixels: list[torch.Tensor], progress: bool | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`encode` for images already through `load`: yields ``(index, latents)`` per size, VAE-batched."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(pixels):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        with progress_bar(len(pixels), "VAE encode", "img", progress) as bar:
            for members in groups.values():
                chunks = []
                for start in range(0, len(members), self.batch_size):
                    batch = torch.stack([pixels[i].to(self.device) for i in members[start : start + self.batch_size]])
                    chunks.append(self.encode_pixels(batch))
                    bar.update(batch.shape[0])
                yield torch.tensor(members, device=self.device), torch.cat(chunks)
