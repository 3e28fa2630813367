"""The pixel front end: SD3 prompt embeddings and VAE latents from images, for ``score_images(images, prompts)``.

Read from a local SD3/SD3.5 diffusers directory:

- `PromptEncoder` (`engine.pixel.prompts`) computes exactly what ``StableDiffusion3Pipeline.encode_prompt``
  computes for a positive prompt (no CFG), behind a thread-safe LRU cache of per-prompt embeddings bounded in bytes,
  because RL loops score many images per prompt and revisit prompts every epoch.
- `load_images` (`engine.pixel.images`) is the image policy: what every user image goes through (colour, size,
  limit) before the VAE.
- `ImageEncoder` (`engine.pixel.vae`) turns loaded images into transformer-space latents
  ``(vae.encode(2x - 1).latent_dist.mean - shift) * scale`` (== SD3's ``output_type="latent"``), and back.
- `PixelFrontEnd` (`engine.pixel.front_end`) holds both encoders and pairs images with their prompts.
"""

from engine.pixel.front_end import PixelFrontEnd, PreparedGroup
from engine.pixel.images import ImageBatch, ImageLike, load_images, resize_pixels
from engine.pixel.prompts import DEFAULT_CACHE_BYTES, PromptEncoder
from engine.pixel.vae import ImageEncoder

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "ImageBatch",
    "ImageEncoder",
    "ImageLike",
    "PixelFrontEnd",
    "PreparedGroup",
    "PromptEncoder",
    "load_images",
    "resize_pixels",
]
