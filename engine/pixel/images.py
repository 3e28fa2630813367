"""User images in, float RGB tensors in [0, 1] out, sized for the VAE and the backbone.

Image policy (what every input goes through, in this order):
1. Colour: every image becomes RGB. Grayscale is replicated to three channels; an alpha channel is dropped (the
   colour values are kept as stored, as PIL's ``convert("RGB")`` does); palette images are expanded by PIL.
2. Size: the whole image is kept (no crop). Optionally downscaled so its longer side is at most ``max_side``
   (aspect ratio kept), then each side is resized to the nearest multiple of ``vae_scale_factor * patch_size``
   (16 for SD3: the latent must be a whole number of 2x2 patches), with bicubic antialiased interpolation and a
   clamp to [0, 1]. Images already of such a size are not resampled. The aspect ratio moves by at most half a
   multiple (8 px) per side.
3. Limit: a side longer than ``pos_embed_max_size * patch_size * vae_scale_factor`` pixels (3072 for SD3.5) is
   rejected with a ValueError: the backbone's position embedding does not cover it. Pass ``max_side`` to downscale.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from engine.io.files import is_regular_file, open_regular

# One image: a PIL image, an image file, a uint8 HWC/HW array, or a float CHW tensor in [0, 1].
ImageLike = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
# A batch: a sequence of ImageLike, a float NCHW tensor in [0, 1] (Flow-GRPO's convention) or a uint8 NHWC array.
ImageBatch = Sequence[ImageLike] | torch.Tensor | np.ndarray


def _size_after_policy(height: int, width: int, multiple: int, max_side: int | None) -> tuple[int, int]:
    """Target (H, W): downscale to ``max_side`` keeping aspect, then round each side to the nearest ``multiple``."""
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    cap = math.inf if max_side is None else max(multiple, max_side // multiple * multiple)

    def fit(side: int) -> int:
        # floor(x + 0.5) rather than round(): Python's round() goes to even on ties, which is harder to predict.
        return int(min(cap, max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)))

    return fit(height), fit(width)


def _rgb_from_channels(x: torch.Tensor, what: str) -> torch.Tensor:
    """[C, H, W] with C in (1, 3, 4) -> [3, H, W]: grayscale replicated, alpha dropped."""
    channels = x.shape[0]
    if channels == 3:
        return x
    if channels == 1:
        return x.expand(3, -1, -1)
    if channels == 4:
        return x[:3]
    raise ValueError(f"{what} has {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")


def _from_uint8_array(array: np.ndarray, what: str) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise TypeError(
            f"{what} is a numpy array of dtype {array.dtype}; expected uint8 HWC in [0, 255] (for floats in [0, 1] "
            "pass a torch tensor CHW)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"{what} has shape {array.shape}; expected a uint8 image array HW or HWC")
    if not array.flags.writeable:
        array = array.copy()  # np.asarray(PIL image) is read-only, which torch.from_numpy warns about
    chw = torch.from_numpy(array).permute(2, 0, 1)
    return _rgb_from_channels(chw, what).float().div_(255.0)


_HIGH_BIT_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _from_pil(image: Image.Image) -> torch.Tensor:
    if image.mode in _HIGH_BIT_DEPTH:
        # 16-bit grayscale (PNG opens as I;16 or I) and float (F) images: PIL's convert("RGB") would clip them at 255
        # (white) or truncate floats to 0, so scale them here instead.
        full_scale = _HIGH_BIT_DEPTH[image.mode]
        array = np.asarray(image).astype(np.float32) / full_scale
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (low >= 0.0 and high <= 1.0):
            expected = "floats in [0, 1]" if image.mode == "F" else "16-bit values in [0, 65535]"
            raise ValueError(
                f"PIL image of mode {image.mode} has values in [{low * full_scale:g}, {high * full_scale:g}]; "
                f"expected {expected} (convert it to 8-bit RGB first)"
            )
        return torch.from_numpy(array)[None].expand(3, -1, -1).contiguous()
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, LA, P, RGBA, CMYK, ...: PIL's own conversion (alpha dropped)
    return _from_uint8_array(np.asarray(image), "PIL image")


def _from_path(path: str | os.PathLike) -> torch.Tensor:
    if not is_regular_file(path, "image file"):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with open_regular(path, "image file") as fh, Image.open(fh) as image:
            return _from_pil(image)
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image file that PIL can read") from e


def _check_float_tensor(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{what} is a {x.dtype} tensor; expected a float tensor in [0, 1] (for uint8 data use x.float() / 255)"
        )
    low, high = torch.aminmax(x.detach())  # one sync for the whole batch
    if not (low >= 0 and high <= 1):  # also false for NaN
        raise ValueError(
            f"{what} has values in [{low.item():.4g}, {high.item():.4g}]; expected [0, 1] (from [-1, 1] decoder "
            "output use (x / 2 + 0.5).clamp(0, 1))"
        )


def _to_pixel_list(images: ImageBatch) -> list[torch.Tensor]:
    """Any accepted input -> list of [3, H, W] float tensors in [0, 1] (CPU, or the input tensor's device)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"image tensor has shape {tuple(images.shape)}; expected NCHW (batch) or CHW")
        if images.shape[0] == 0:
            raise ValueError("images is empty: pass at least one image")
        _check_float_tensor(images, "image tensor")
        return [_rgb_from_channels(x, "image tensor") for x in images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("images is empty: pass at least one image")
            return [_from_uint8_array(a, f"images[{i}]") for i, a in enumerate(images)]
        return [_from_uint8_array(images, "image array")]
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list of PIL images, paths, uint8 arrays or CHW tensors, or an NCHW float tensor; "
            f"got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one image")
    pixels = []
    for i, item in enumerate(images):
        what = f"images[{i}]"
        if isinstance(item, Image.Image):
            pixels.append(_from_pil(item))
        elif isinstance(item, (str, os.PathLike)):
            pixels.append(_from_path(item))
        elif isinstance(item, np.ndarray):
            pixels.append(_from_uint8_array(item, what))
        elif isinstance(item, torch.Tensor):
            if item.ndim != 3:
                raise ValueError(f"{what} has shape {tuple(item.shape)}; expected a CHW float tensor in [0, 1]")
            _check_float_tensor(item, what)
            pixels.append(_rgb_from_channels(item, what))
        else:
            raise TypeError(
                f"{what} is a {type(item).__name__}; expected a PIL image, a file path, a uint8 HWC numpy array or a "
                "CHW float tensor in [0, 1]"
            )
    return pixels


def load_images(
    images: ImageBatch,
    *,
    size_multiple: int = 16,
    max_side: int | None = None,
    max_image_side: int | None = None,
) -> list[torch.Tensor]:
    """Decode, convert and resize images per the module's policy.

    Args:
        images: a list of PIL images / file paths / uint8 HWC (or HW) numpy arrays / float CHW tensors in [0, 1]
            (mixed is fine), a float NCHW tensor in [0, 1], or a uint8 NHWC array.
        size_multiple: each output side is a multiple of this (SD3: VAE 8 x patch 2 = 16).
        max_side: if set, downscale (keeping aspect) so the longer side is at most this many pixels.
        max_image_side: if set, a ValueError for any image whose resized side exceeds it (the backbone's limit).

    Returns:
        One float32 tensor ``[3, H, W]`` in [0, 1] per image, on the CPU (or on the input tensor's device).
    """
    if max_side is not None and (not isinstance(max_side, int) or max_side < size_multiple):
        raise ValueError(f"max_side must be an int >= {size_multiple} pixels, got {max_side!r}")
    out = []
    for i, x in enumerate(_to_pixel_list(images)):
        height, width = x.shape[-2:]
        if min(height, width) < 1:
            raise ValueError(f"images[{i}] is empty ({height}x{width} pixels)")
        target = _size_after_policy(height, width, size_multiple, max_side)
        if max_image_side is not None and max(target) > max_image_side:
            raise ValueError(
                f"images[{i}] is {height}x{width} pixels ({target[0]}x{target[1]} after resizing); this backbone's "
                f"position embedding covers at most {max_image_side} pixels per side: pass max_side={max_image_side} "
                "(or less) to downscale"
            )
        out.append(resize_pixels(x.float(), target))
    return out


def resize_pixels(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one image resampling of the project: ``[3, H, W]`` in [0, 1] -> ``[3, *size]``, antialiased bicubic
    (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return x.clamp_(0.0, 1.0)  # bicubic overshoots at edges; the VAE expects [-1, 1] after 2x - 1
