"""Our reward checkpoint (``reward_config.json``, ``head.safetensors``, optional ``backbone.safetensors``): written
atomically beside the target and swapped in, recovered after a crash, read back with every path and weight checked."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from engine.config import BackboneConfig, RewardConfig
from engine.heads import RewardHead, build_head
from engine.io.atomic import reporting_disk_full
from engine.io.backbone import check_floating, checked_weights
from engine.io.files import inside, is_regular_file, read_json
from engine.io.sources import TensorSource
from engine.schema import Schema, SchemaError, validate

REWARD_FORMAT = "dit-reward/1"
REWARD_CONFIG = "reward_config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CHECKPOINT_FILES = frozenset({REWARD_CONFIG, HEAD_FILE, BACKBONE_FILE})


# ---------------------------------------------------------------------------------------------- reward checkpoint


CORE_FIELDS = ("format", "reward", "backbone", "backbone_weights")
MAX_CONFIG_BYTES = 16 * 2**20  # a reward config is a few kB; its metadata (training config, validation) stays small
METADATA = "metadata"
# A sibling of checkpoint NAME that an export in process PID is writing (tmp) or has just moved aside (old).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs on this machine (checkpoints are assumed to be written from one host)."""
    if pid == os.getpid():
        return True  # another thread of this process may be exporting
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_complete(directory: Path) -> bool:
    return (directory / REWARD_CONFIG).is_file() and (directory / HEAD_FILE).is_file()


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Finish what a killed export left: if `directory` is missing but a complete copy was moved aside
    (`.NAME.old-PID-*`, the kill came between the two renames of `save_reward_checkpoint`), move it back; then remove
    the `.NAME.tmp-*` / `.NAME.old-*` siblings of dead processes. Best effort: a read-only parent is left as it is."""
    directory = Path(directory).resolve()
    try:
        siblings = list(directory.parent.iterdir())
    except OSError:
        return
    stale = []
    for path in siblings:
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == directory.name and not _process_alive(int(match["pid"])):
            stale.append((match["kind"], path))
    moved_aside = sorted((p for kind, p in stale if kind == "old" and _is_complete(p)), key=lambda p: p.stat().st_mtime)
    try:
        if not directory.exists() and moved_aside:
            os.replace(moved_aside[-1], directory)
            _fsync_dir(directory.parent)
        for _, path in stale:
            if path.exists():
                shutil.rmtree(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_sibling(directory: Path, kind: str) -> Path:
    """A fresh name `.NAME.KIND-PID-HEX` beside `directory` (PID lets a later run tell a dead export's leftovers)."""
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}")


_SAVE_REMEDY = "saving would replace the whole directory: save into a new directory or an existing reward checkpoint"


def check_replaceable(directory: Path, remedy: str = _SAVE_REMEDY) -> None:
    """ValueError unless `directory` is absent or a directory holding nothing but reward checkpoint files: replacing
    it deletes whatever else is there. `remedy` ends the message about such files (what replaces it, what to do)."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory: save the reward checkpoint elsewhere")
    strangers = sorted(p.name for p in directory.iterdir() if p.name not in CHECKPOINT_FILES)
    if strangers:
        shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        raise ValueError(f"{directory} holds files that are not part of a reward checkpoint ({shown}); {remedy}")


def save_reward_checkpoint(
    directory: str | os.PathLike,
    reward: RewardConfig,
    backbone_cfg: BackboneConfig,
    head: RewardHead,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `reward_config.json`, `head.safetensors` and optionally `backbone.safetensors` so that a reader finds
    the old or the new checkpoint, never neither and never a half-written one: everything is written and fsynced in a
    sibling `.NAME.tmp-PID-*` that then replaces `directory` (the old one moved aside to `.NAME.old-PID-*` first). A
    kill between the two renames is repaired by `recover_checkpoint`, which the next save and the next load run.
    `metadata` (JSON) is stored under its own key and cannot shadow the core fields. The directory gets the
    permissions the umask gives a new directory. An existing `directory` is replaced only if it is a reward
    checkpoint (holds nothing but checkpoint files): anything else there would be deleted, so that is a ValueError."""
    directory = Path(directory).resolve()  # ("." has no name to build the sibling temp dir from)
    meta = {
        "format": REWARD_FORMAT,
        "reward": reward.to_dict(),
        "backbone": {"preset": backbone_cfg.preset_name(), "config": backbone_cfg.to_dict()},
        "backbone_weights": BACKBONE_FILE if backbone_state is not None else None,
        METADATA: dict(metadata or {}),
    }
    try:
        text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable (dicts, lists, str, numbers): {e}") from e
    recover_checkpoint(directory)
    check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(directory, "tmp")
    tmp.mkdir()  # mode 0o777 & ~umask, like any new directory
    old = None
    tensors = [*head.state_dict().values(), *(backbone_state or {}).values()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + len(text)
    try:
        with reporting_disk_full(directory, nbytes):  # a full disk is a DiskFullError, whichever writer hits it
            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
            if backbone_state is not None:
                save_file({k: v.detach().cpu().clone() for k, v in backbone_state.items()}, str(tmp / BACKBONE_FILE))
            (tmp / REWARD_CONFIG).write_text(text)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
        if directory.exists():
            old = _new_sibling(directory, "old")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        if old is not None and not directory.exists():
            os.replace(old, directory)  # put the old checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


class BackboneSection(Schema):
    preset: str | None = None
    config: dict[str, Any]


class RewardFile(Schema):
    """`reward_config.json`: the format tag, the two configs, the optional fine-tuned backbone file, metadata."""

    format: Literal["dit-reward/1"]
    reward: dict[str, Any]
    backbone: BackboneSection
    backbone_weights: str | None = None
    metadata: dict[str, Any] = {}


def read_reward_config(directory: str | os.PathLike) -> tuple[dict, RewardConfig, BackboneConfig]:
    """Read and check `reward_config.json` (after `recover_checkpoint`) through the safe reader and its schemas.
    Returns the document, normalised: every non-core field under "metadata" (older checkpoints kept them at the top
    level), and "backbone_weights" as the checked absolute `Path` of the file or None; then the reward and backbone
    configs. Errors name the file and the field."""
    directory = Path(directory)
    recover_checkpoint(directory)
    if not is_regular_file(directory / REWARD_CONFIG, "reward config"):
        raise FileNotFoundError(f"{directory} is not a reward checkpoint: {REWARD_CONFIG} missing")
    path = inside(directory, REWARD_CONFIG, REWARD_CONFIG)
    meta = read_json(path, "reward config", max_bytes=MAX_CONFIG_BYTES)
    if isinstance(meta, dict):  # fields of older checkpoints, kept at the top level then: metadata now
        legacy = {k: v for k, v in meta.items() if k not in (*CORE_FIELDS, METADATA)}
        meta = {k: v for k, v in meta.items() if k not in legacy}
    else:
        legacy = {}
    document = validate(RewardFile, meta, str(path))
    missing = set(RewardConfig.model_fields) - RewardConfig.OPTIONAL_IN_FILES - set(document.reward)
    if missing:
        raise SchemaError(f"{path}: reward.{sorted(missing)[0]}: missing, expected a value (required)")
    reward = validate(RewardConfig, document.reward, f"{path}: reward")
    missing = set(BackboneConfig.model_fields) - set(document.backbone.config)
    if missing:
        raise SchemaError(f"{path}: backbone.config.{sorted(missing)[0]}: missing, expected a value (required)")
    backbone = validate(BackboneConfig, document.backbone.config, f"{path}: backbone.config")
    try:
        reward.check_against(backbone)
    except ValueError as e:
        raise SchemaError(f"{path}: reward.layers: {e}") from e
    weights = document.backbone_weights
    if weights is not None:
        weights = inside(directory, weights, f"{path}: backbone_weights")
    normalised = {
        "format": REWARD_FORMAT,
        "reward": document.reward,
        "backbone": document.backbone.to_dict(),
        "backbone_weights": weights,
        METADATA: {**legacy, **document.metadata},
    }
    return normalised, reward, backbone


def load_head(directory: str | os.PathLike, reward: RewardConfig, backbone: BackboneConfig) -> RewardHead:
    """The head of a reward checkpoint, from `head.safetensors`."""
    path = inside(directory, HEAD_FILE, f"the head file {Path(directory) / HEAD_FILE}")
    source = TensorSource([path])
    return head_from_state(reward, backbone, source, source.describe())


def head_from_state(
    reward: RewardConfig, backbone: BackboneConfig, source: Mapping[str, torch.Tensor], where: str
) -> RewardHead:
    """The head `reward` describes, its weights from `source` (`where`: its file, named in errors): every key and
    shape must match exactly; values are upcast to fp32 and must be finite floating point."""
    with torch.device("meta"):  # shapes first: a config's head sizes allocate nothing until the file agrees
        head = build_head(reward, backbone)
    expected = head.state_dict()
    for key in expected:
        if key not in source:
            raise ValueError(f"missing key {key!r} in {where}")
        if tuple(source[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"shape mismatch for {key!r} in {where}: checkpoint {list(source[key].shape)}, head "
                f"{list(expected[key].shape)}"
            )
    extra = sorted(set(source) - set(expected))
    if extra:
        raise ValueError(f"unexpected key {extra[0]!r} in {where}")
    raw = {k: source[k] for k in expected}
    for key, tensor in raw.items():
        check_floating(key, tensor, where)  # before the cast would hide an integer tensor
    state = checked_weights({k: v.to(torch.float32) for k, v in raw.items()}, where, torch.float32)
    # the sizes agree with the file: allocate
    head = build_head(reward, backbone)
    head.load_state_dict(state)  # (copied into fresh parameters, not adopted from the file's buffer)
    return head
