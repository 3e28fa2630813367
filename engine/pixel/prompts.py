"""SD3's three text encoders behind a thread-safe, byte-bounded LRU cache of per-prompt embeddings.

`PromptEncoder` computes exactly what ``StableDiffusion3Pipeline.encode_prompt`` computes for a positive prompt (no
CFG): CLIP-L and CLIP-G penultimate hidden states concatenated, zero-padded to the T5 width, then T5 states appended
along the sequence -> ``prompt_embeds [B, 77 + T5_len, joint_dim]``; both CLIP projections concatenated -> ``pooled
[B, pooled_dim]``.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.checks import resolve_device
from engine.lru import LRUCache
from engine.pixel.common import progress_bar, read_model_json
from engine.prompt_length import SD3_T5_TOKENS

# ~190 SD3.5 prompts in fp32 (333 x 4096 x 4 B = 5.5 MB each), ~390 in bf16.
DEFAULT_CACHE_BYTES = 1 << 30


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56 and warns on the old name from 5.0.
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _nbytes(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


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
        max_sequence_length: int = SD3_T5_TOKENS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encoders_device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if len(tokenizers) != 3 or len(text_encoders) != 3:
            raise ValueError("PromptEncoder needs SD3's three tokenizers and text encoders (CLIP-L, CLIP-G, T5)")
        if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0 (0 disables the cache), got {cache_bytes!r}")
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
        self._cache: LRUCache[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = LRUCache(cache_bytes, _nbytes)
        self._lock = threading.Lock()  # one lookup of the cache and the in-flight table; hits/misses
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
        max_sequence_length: int = SD3_T5_TOKENS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encoders_device: torch.device | str | None = None,
    ) -> PromptEncoder:
        """Load the tokenizers and text encoders from a local SD3/SD3.5 diffusers directory, weights in ``dtype``."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        base = Path(base_dir)
        read_model_json(base / "model_index.json")
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
        return self._cache.total_cost

    def __len__(self) -> int:
        """Number of cached prompts."""
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

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
                elif (entry := self._cache.get(key)) is not None:
                    self.hits += 1
                    found[prompt] = entry
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
            with progress_bar(len(todo), "text encoders", "prompt", progress) as bar:
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    with self._encoder_lock:
                        embeds, pooled = self._encode(chunk, length)
                    for i, prompt in enumerate(chunk):
                        # clone: a row view would keep the whole batch alive and break the byte accounting.
                        entry = (embeds[i].clone(), pooled[i].clone())
                        with self._lock:
                            self._cache.put((prompt, length), entry)
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
