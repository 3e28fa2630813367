"""The pixel front end: SD3 prompt embeddings and VAE latents from images, for ``score_images(images, prompts)``.

Two halves, each reading a local SD3/SD3.5 diffusers directory:

- `PromptEncoder` computes exactly what ``StableDiffusion3Pipeline.encode_prompt`` computes for a positive
  prompt (no CFG): CLIP-L and CLIP-G penultimate hidden states concatenated, zero-padded to the T5 width, then T5
  states appended along the sequence -> ``prompt_embeds [B, 77 + T5_len, joint_dim]``; both CLIP projections
  concatenated -> ``pooled [B, pooled_dim]``. It keeps an LRU cache of per-prompt embeddings bounded in bytes,
  because RL loops score many images per prompt and revisit prompts every epoch.
- `ImageEncoder` turns images (PIL, files, uint8 arrays, float tensors) into transformer-space latents
  ``(vae.encode(2x - 1).latent_dist.mean - shift) * scale`` (== SD3's ``output_type="latent"``), and back.

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

import gc
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from engine.checks import resolve_device

# One image: a PIL image, an image file, a uint8 HWC/HW array, or a float CHW tensor in [0, 1].
ImageLike = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
# A batch: a sequence of ImageLike, a float NCHW tensor in [0, 1] (Flow-GRPO's convention) or a uint8 NHWC array.
ImageBatch = Sequence[ImageLike] | torch.Tensor | np.ndarray

# ~190 SD3.5 prompts in fp32 (333 x 4096 x 4 B = 5.5 MB each), ~390 in bf16.
DEFAULT_CACHE_BYTES = 1 << 30
# Progress bars appear by default from this many items on: below it a bar is noise in tests and RL logs.
_PROGRESS_MIN_ITEMS = 64


def _progress(total: int, desc: str, unit: str, progress: bool | None) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only from `_PROGRESS_MIN_ITEMS` items on."""
    enabled = total >= _PROGRESS_MIN_ITEMS if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56 and warns on the old name from 5.0.
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} not found: expected a local SD3/SD3.5 diffusers directory (model_index.json, ...)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------- prompts


class PromptEncoder:
    """SD3's three text encoders with a byte-bounded LRU cache of per-prompt embeddings.

    Encoders run on ``encoders_device`` (default: ``device``); embeddings are returned, and cached, on ``device`` in
    ``dtype`` so that a cache hit costs no transfer. Counting: every requested prompt is one hit or one miss; a
    prompt repeated within a call is encoded once and its repeats count as hits.

    Thread-safe (Flow-GRPO calls reward functions from a thread pool): a prompt is encoded once however many
    threads ask for it at the same time: the first registers an in-flight future, the others count a hit and wait
    on it. The text encoders run one batch at a time (HF fast tokenizers are not safe to share across threads),
    and the cache and its byte count change only under one lock, so ``cached_bytes`` is exact.
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 256,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encoders_device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if len(tokenizers) != 3 or len(text_encoders) != 3:
            raise ValueError("PromptEncoder needs SD3's three tokenizers and text encoders (CLIP-L, CLIP-G, T5)")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (0 disables the cache), got {cache_bytes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizers
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoders
        self.device = resolve_device(device)
        self.encoders_device = self.device if encoders_device is None else torch.device(encoders_device)
        self.dtype = dtype
        self.max_sequence_length = self._check_length(max_sequence_length)
        # The pipeline pads both CLIP tokenizers to the first one's model_max_length (77).
        self.clip_max_length = int(self.tokenizer.model_max_length)
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # the cache, its byte count, hits/misses and the in-flight table
        self._encoder_lock = threading.Lock()  # one encoder batch at a time; release waits for it
        self._in_flight: dict[tuple[str, int], Future] = {}  # prompts some thread is encoding now
        for encoder in text_encoders:
            encoder.to(self.encoders_device).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        base_dir: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 256,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encoders_device: torch.device | str | None = None,
    ) -> PromptEncoder:
        """Load the tokenizers and text encoders from a local SD3/SD3.5 diffusers directory, weights in ``dtype``."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        base = Path(base_dir)
        _read_json(base / "model_index.json")
        tokenizers = (
            CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
            T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_3"),
        )
        kw = _dtype_kwarg(dtype)
        encoders = (
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder", **kw),
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **kw),
            T5EncoderModel.from_pretrained(base, subfolder="text_encoder_3", **kw),
        )
        return cls(
            tokenizers, encoders, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
            cache_bytes=cache_bytes, encoders_device=encoders_device,
        )  # fmt: skip

    @staticmethod
    def _check_length(max_sequence_length: int) -> int:
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int (SD3: 256, Flow-GRPO: 128), got "
                             f"{max_sequence_length!r}")  # fmt: skip
        return max_sequence_length

    @property
    def cached_bytes(self) -> int:
        """Bytes held by cached embeddings (always <= ``cache_bytes``)."""
        return self._cached_bytes

    def __len__(self) -> int:
        """Number of cached prompts."""
        return len(self._cache)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    @property
    def encoders_released(self) -> bool:
        return self.text_encoder is None

    def release_encoders(self) -> None:
        """Free the three text encoders (~5.5 B parameters for SD3.5); afterwards only cached prompts are served."""
        on_cuda = self.encoders_device.type == "cuda"
        with self._encoder_lock:
            self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def __call__(
        self, prompts: str | Sequence[str], max_sequence_length: int | None = None, progress: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts as SD3 does.

        Returns ``prompt_embeds [B, 77 + max_sequence_length, joint_dim]`` and ``pooled [B, pooled_dim]`` on
        ``device`` in ``dtype``. ``max_sequence_length`` defaults to the encoder's (T5 tokens, padded/truncated).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt string")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {bad[0]}")
        length = self.max_sequence_length if max_sequence_length is None else self._check_length(max_sequence_length)

        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        waiting: dict[str, Future] = {}  # prompts another thread is encoding
        missing: dict[str, Future] = {}  # ours to encode; ordered: encode order = first-request order
        with self._lock:
            for prompt in prompts:
                key = (prompt, length)
                if prompt in found or prompt in waiting or prompt in missing:
                    self.hits += 1  # a repeat within this call
                elif key in self._cache:
                    self.hits += 1
                    self._cache.move_to_end(key)
                    found[prompt] = self._cache[key]
                elif key in self._in_flight:
                    self.hits += 1
                    waiting[prompt] = self._in_flight[key]
                else:
                    self.misses += 1
                    missing[prompt] = Future()
            if missing and self.encoders_released:
                shown = ", ".join(repr(p[:60]) for p in list(missing)[:3])
                raise RuntimeError(
                    f"{len(missing)} prompt(s) not in the embedding cache ({shown}, ...) and the text encoders were "
                    "released: encode every prompt before release_encoders(), or reload the encoder"
                )
            self._in_flight.update(((p, length), f) for p, f in missing.items())
        if missing:
            self._encode_missing(missing, length, progress)
            found.update((p, f.result()) for p, f in missing.items())
        found.update((p, f.result()) for p, f in waiting.items())  # re-raises the encoding thread's error
        embeds = torch.stack([found[p][0] for p in prompts])
        pooled = torch.stack([found[p][1] for p in prompts])
        return embeds, pooled

    encode = __call__

    def _encode_missing(self, missing: dict[str, Future], length: int, progress: bool | None) -> None:
        """Encode the prompts this call registered as in flight; resolve (and unregister) each one's future, with
        the error if encoding fails, so no waiting thread hangs."""
        todo = list(missing)
        try:
            with _progress(len(todo), "text encoders", "prompt", progress) as bar:
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    with self._encoder_lock:
                        embeds, pooled = self._encode(chunk, length)
                    for i, prompt in enumerate(chunk):
                        # clone: a row view would keep the whole batch alive and break the byte accounting.
                        entry = (embeds[i].clone(), pooled[i].clone())
                        with self._lock:
                            self._insert((prompt, length), entry)
                            del self._in_flight[(prompt, length)]
                        missing[prompt].set_result(entry)
                    bar.update(len(chunk))
        except BaseException as err:
            with self._lock:
                for prompt, future in missing.items():
                    if not future.done():
                        del self._in_flight[(prompt, length)]
                        future.set_exception(err)
            raise

    def _insert(self, key: tuple[str, int], entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add an entry and evict least-recently used ones down to the budget (caller holds `_lock`)."""
        size = sum(t.numel() * t.element_size() for t in entry)
        if size > self.cache_bytes:
            return  # larger than the whole budget (or caching disabled)
        self._cache[key] = entry
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(t.numel() * t.element_size() for t in old)

    @torch.no_grad()
    def _encode(self, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``StableDiffusion3Pipeline.encode_prompt`` (positive branch, clip_skip None, one image per prompt).

        no_grad rather than inference_mode: cached embeddings may later enter an autograd graph (head training).
        """
        clip_states, clip_pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(ids.to(self.encoders_device), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])  # penultimate layer, [B, 77, width]
            clip_pooled.append(out.text_embeds)  # projection of the EOS state, [B, projection_dim]
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        t5_states = self.text_encoder_3(ids.to(self.encoders_device))[0]  # [B, length, d_model]
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))  # zero-pad CLIP width to joint_dim
        embeds = torch.cat([clip, t5_states], dim=-2)
        pooled = torch.cat(clip_pooled, dim=-1)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)


# ---------------------------------------------------------------------------------------------------- images


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
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
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
        x = x.float()
        if target != (height, width):
            x = F.interpolate(x[None], size=target, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots at edges; the VAE expects [-1, 1] after 2x - 1
        out.append(x)
    return out


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
        upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        self.vae_dtype = torch.float32 if upcast else dtype
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
        transformer = _read_json(base / "transformer" / "config.json")
        upcast = dtype == torch.float16 and _read_json(base / "vae" / "config.json").get("force_upcast", False)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32 if upcast else dtype)
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
        with _progress(len(pixels), "VAE encode", "img", progress) as bar:
            for members in groups.values():
                chunks = []
                for start in range(0, len(members), self.batch_size):
                    batch = torch.stack([pixels[i].to(self.device) for i in members[start : start + self.batch_size]])
                    chunks.append(self.encode_pixels(batch))
                    bar.update(batch.shape[0])
                yield torch.tensor(members, device=self.device), torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------- bundle


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
        max_sequence_length: int = 256,
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
    ) -> list[PreparedGroup]:
        """Pair image ``i`` with ``prompts[i]``; one `PreparedGroup` per resized image size.

        Each distinct prompt is encoded once, before any VAE work (a bad prompt fails fast). Scores computed per
        group go back to input order with ``scores[group.index] = group_scores``.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image (got a single str)")
        pixels = self.image_encoder.load(images, max_side=max_side)
        if len(prompts) != len(pixels):
            raise ValueError(f"got {len(pixels)} images but {len(prompts)} prompts: pass one prompt per image")
        distinct = list(dict.fromkeys(prompts))
        embeds, pooled = self.prompt_encoder(distinct, progress=progress)
        slot = {prompt: i for i, prompt in enumerate(distinct)}
        prompt_of_image = torch.tensor([slot[p] for p in prompts], device=embeds.device)  # [N] into distinct
        groups = []
        for index, latents in self.image_encoder.encode_loaded(pixels, progress):
            used, prompt_index = torch.unique(prompt_of_image[index.to(embeds.device)], return_inverse=True)
            groups.append(PreparedGroup(index, latents, embeds[used], pooled[used], prompt_index))
        return groups


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "ImageBatch",
    "ImageEncoder",
    "ImageLike",
    "PixelFrontEnd",
    "PreparedGroup",
    "PromptEncoder",
    "load_images",
]
