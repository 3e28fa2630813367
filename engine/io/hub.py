"""Hugging Face hub ids where a local path is expected: `RewardEngine.from_pretrained("org/name",
base="stabilityai/stable-diffusion-3.5-large")`.

A reference that exists on disk is a path, whatever it looks like. Otherwise an `org/name` reference is resolved with
`huggingface_hub.snapshot_download`: the local cache first (no network), then a download unless offline mode is on
(`HF_HUB_OFFLINE=1`). Files that would be unpickled are never fetched. The result is the cache's snapshot folder,
whose files are symlinks into the repository's `blobs/`; `engine.io.files.inside` treats those as inside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.io.files import file_status

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# What a base model needs: the diffusers layout (config, scheduler, transformer shards, VAE, text encoders and
# tokenizers). SD3.5 repositories also ship the transformer as one 16 GB single file at the top level: not fetched.
BASE_FILES = (
    "model_index.json",
    "scheduler/*",
    "transformer/*",
    "vae/*",
    "text_encoder*/*",
    "tokenizer*/*",
)
# What a reward checkpoint consists of, in either format `engine.io.formats` reads: ours (reward_config.json,
# head/backbone safetensors) and DiNa-LRM's (config.json, checkpoint/backbone_lora/ as safetensors, and
# checkpoint/rm_head.pt, the one pickle fetched: `engine.io.dina` reads it with the weights-only unpickler).
REWARD_FILES = ("*.json", "*.safetensors", "checkpoint/rm_head.pt")
PICKLES = ("*.bin", "*.ckpt", "*.pth", "*.pkl", "*.msgpack", "*.h5")


def resolve(
    reference: str | os.PathLike, what: str, allow_patterns: tuple[str, ...] | None = None, ignore_pickles: bool = True
) -> Path:
    """`reference` as a local path: itself when it exists (or does not look like a hub id), else the local snapshot
    of the hub repository it names (`what` names it in errors, e.g. "base model")."""
    path = Path(reference)
    if isinstance(reference, os.PathLike) or file_status(path, what) is not None or not HUB_ID.match(str(reference)):
        return path
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=str(reference), allow_patterns=list(allow_patterns) if allow_patterns else None)
    kwargs["ignore_patterns"] = list(PICKLES) if ignore_pickles else None
    try:
        return Path(huggingface_hub.snapshot_download(local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        pass
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{what} {reference!r} is neither a local path nor in {where}, and offline mode is on (HF_HUB_OFFLINE): "
            f"download it where there is network (`hf download {reference}`) or pass a local directory"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(**kwargs))
    except Exception as e:  # network, authentication, a missing repository: one message that says what to do
        raise FileNotFoundError(
            f"{what} {reference!r} is neither a local path nor in {where}, and downloading it failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): check the id and your network or "
            f"token (`hf auth login` for gated models such as SD3.5), or pass a local directory"
        ) from None


__all__ = ["BASE_FILES", "HUB_ID", "REWARD_FILES", "resolve"]
