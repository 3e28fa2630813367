"""The prompt length a reward head was trained at, and holding the engine's callers to it.

SD3's ``prompt_embeds`` are ``[B, 77 + T5_len, joint_dim]``: 77 CLIP tokens, then T5 padded or truncated to
``max_sequence_length`` (SD3's pipeline: 256; Flow-GRPO: 128). Attention runs over every text token, padding
included, so a head trained at one T5 length scores another length's embeddings differently. The trainer records
its cache's length in the checkpoint (``metadata.training.max_sequence_length``); it is the default of every path
that encodes text for the engine, and a latent-path caller whose ``prompt_embeds`` have another length is warned
once per engine (or refused, with ``strict_prompt_length=True``).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

CLIP_TOKENS = 77  # both CLIP tokenizers pad to 77 in SD3's pipeline
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
MAX_T5_TOKENS = 512  # T5-XXL's context
_ENGINE_DIR = os.path.dirname(__file__) + os.sep  # (spelt as co_filename spells it: both come from the import)


def recorded_t5_tokens(metadata: dict[str, Any], where: str) -> int | None:
    """The T5 length a checkpoint's metadata records (``training.max_sequence_length``), or None when absent.
    `where` names the file for errors."""
    training = metadata.get("training")
    if not isinstance(training, dict) or training.get("max_sequence_length") is None:
        return None
    value = training["max_sequence_length"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_T5_TOKENS:
        raise ValueError(
            f"{where}: field 'metadata.training.max_sequence_length' is {value!r:.40}, expected an int in "
            f"[1, {MAX_T5_TOKENS}] (the T5 tokens the reward was trained at)"
        )
    return value


def checkpoint_t5_tokens(checkpoint: str | os.PathLike) -> int:
    """The T5 length a reward checkpoint was trained at (SD3's 256 when it records none), without loading it."""
    from engine.io.checkpoint import REWARD_CONFIG, read_reward_config

    meta, _, _ = read_reward_config(checkpoint)
    return recorded_t5_tokens(meta["metadata"], str(Path(checkpoint) / REWARD_CONFIG)) or SD3_T5_TOKENS


class PromptLength:
    """The T5 length an engine's callers should encode prompts at.

    ``t5_tokens``: the length text-encoding paths use (the checkpoint's, else SD3's 256). ``enforced``: whether
    latent-path callers are held to it: engines loaded from a checkpoint, or built with ``max_sequence_length=`` or
    ``strict_prompt_length=True``; random-weight and fresh-head engines have no trained length to hold anyone to.
    ``strict``: a mismatch raises instead of warning once."""

    def __init__(self, t5_tokens: int | None, strict: bool = False) -> None:
        if t5_tokens is not None and (
            isinstance(t5_tokens, bool) or not isinstance(t5_tokens, int) or not 1 <= t5_tokens <= MAX_T5_TOKENS
        ):
            raise ValueError(f"max_sequence_length must be an int in [1, {MAX_T5_TOKENS}] (T5 tokens; SD3: 256, "
                             f"Flow-GRPO: 128), got {t5_tokens!r}")  # fmt: skip
        if not isinstance(strict, bool):
            raise TypeError(f"strict_prompt_length must be a bool, got {type(strict).__name__}")
        self.t5_tokens = SD3_T5_TOKENS if t5_tokens is None else t5_tokens
        self.enforced = t5_tokens is not None or strict
        self.strict = strict
        self._warned = False
        self._lock = threading.Lock()

    @property
    def text_tokens(self) -> int:
        """``prompt_embeds.shape[1]`` at this length: 77 CLIP tokens + T5."""
        return CLIP_TOKENS + self.t5_tokens

    def check(self, text_tokens: int) -> None:
        """Warn once (or raise, when strict) if ``prompt_embeds`` of `text_tokens` tokens do not match."""
        if not self.enforced or text_tokens == self.text_tokens:
            return
        message = (
            f"prompt_embeds have {text_tokens} tokens but the reward was trained at {self.text_tokens} "
            f"({CLIP_TOKENS} CLIP + {self.t5_tokens} T5, max_sequence_length={self.t5_tokens}): rewards shift with "
            f"the T5 padding length; encode prompts with max_sequence_length={self.t5_tokens}"
        )
        if self.strict:
            raise ValueError(message + " (strict_prompt_length=True)")
        with self._lock:
            if self._warned:
                return
            self._warned = True
        warnings.warn(message + " (warned once per engine)", RuntimeWarning, stacklevel=_first_outside_engine())


def _first_outside_engine() -> int:
    """The `stacklevel` of the caller's first frame outside the engine package (the line that passed the prompts)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_ENGINE_DIR):
        frame, level = frame.f_back, level + 1
    return level
