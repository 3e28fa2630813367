"""Our reward checkpoint (``reward_config.json``, ``head.safetensors``, optional ``backbone.safetensors``): written
atomically beside the target and swapped in, recovered after a crash, read back with every path and weight checked."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.config import BackboneConfig, RewardConfig
from engine.head import RewardHead
from engine.io.atomic import reporting_disk_full
from engine.io.backbone import check_floating, checked_weights
from engine.io.sources import TensorSource

REWARD_FORMAT = "dit-reward/1"
REWARD_CONFIG = "reward_config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CHECKPOINT_FILES = frozenset({REWARD_CONFIG, HEAD_FILE, BACKBONE_FILE})


# ---------------------------------------------------------------------------------------------- reward checkpoint


CORE_FIELDS = ("format", "reward", "backbone", "backbone_weights")
METADATA = "metadata"
# A sibling of checkpoint NAME that an export in process PID is writing (tmp) or has just moved aside (old).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def checked_path(directory: str | os.PathLike, name: object, field: str) -> Path:
    """`directory / name` for a file a checkpoint names, refused unless it resolves (symlinks followed) inside
    `directory`: a checkpoint must not reach `../other/x.safetensors` or `/etc/passwd`. `field` names where the
    name came from (e.g. "reward_config.json field 'backbone_weights'") for the error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{field} must be a file name inside {directory}, got {name!r}")
    root = Path(directory).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(
            f"{field} is {name!r}, which resolves to {path}, outside the checkpoint directory {root}: a checkpoint "
            f"may only name files inside itself"
        )
    return path


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


def _require_dict(value: object, field: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: field {field!r} must be a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def _build(cls: type, fields: dict, field: str, path: Path, required: set[str]):
    """A config dataclass from a JSON object: every key known, every required key present, values checked by the
    dataclass; errors name the file and the field."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} in {field!r}; expected {sorted(known)}")
    missing = sorted(required - set(fields))
    if missing:
        raise ValueError(f"{path}: field {field!r} lacks {', '.join(repr(m) for m in missing)} (required)")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid field {field!r}: {e}") from e


def read_reward_config(directory: str | os.PathLike) -> tuple[dict, RewardConfig, BackboneConfig]:
    """Read and check `reward_config.json` (after `recover_checkpoint`). Returns the document, normalised: every
    non-core field under "metadata" (older checkpoints kept them at the top level), and "backbone_weights" as the
    checked absolute `Path` of the file or None; then the reward and backbone configs. Errors name the file and the
    field."""
    directory = Path(directory)
    recover_checkpoint(directory)
    if not (directory / REWARD_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} is not a reward checkpoint: {REWARD_CONFIG} missing")
    path = checked_path(directory, REWARD_CONFIG, REWARD_CONFIG)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): a corrupt reward config") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt reward config {path}: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != REWARD_FORMAT:
        raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}, expected {REWARD_FORMAT!r}")
    metadata = _require_dict(meta.get(METADATA, {}), METADATA, path)
    legacy = {k: v for k, v in meta.items() if k not in (*CORE_FIELDS, METADATA)}
    reward_fields = _require_dict(meta.get("reward"), "reward", path)
    reward = _build(
        RewardConfig,
        reward_fields,
        "reward",
        path,
        # head_outputs is optional: a checkpoint without it has a point-reward head
        required={f.name for f in dataclasses.fields(RewardConfig)} - {"head_outputs"},
    )
    backbone_section = _require_dict(meta.get("backbone"), "backbone", path)
    backbone = _build(
        BackboneConfig,
        _require_dict(backbone_section.get("config"), "backbone.config", path),
        "backbone.config",
        path,
        required={f.name for f in dataclasses.fields(BackboneConfig)},
    )
    try:
        reward.check_against(backbone)
    except ValueError as e:
        raise ValueError(f"{path}: field 'reward.layers': {e}") from e
    weights = meta.get("backbone_weights")
    if weights is not None:
        weights = checked_path(directory, weights, f"{path} field 'backbone_weights'")
    normalised = {
        "format": REWARD_FORMAT,
        "reward": reward_fields,
        "backbone": backbone_section,
        "backbone_weights": weights,
        METADATA: {**legacy, **metadata},
    }
    return normalised, reward, backbone


def load_head(directory: str | os.PathLike, reward: RewardConfig, dim: int) -> RewardHead:
    path = checked_path(directory, HEAD_FILE, f"the head file {Path(directory) / HEAD_FILE}")
    source = TensorSource([path])
    with torch.device("meta"):  # shapes first: a config's head sizes allocate nothing until the file agrees
        head = RewardHead(len(reward.layers), dim, reward.head_hidden, reward.head_outputs)
    expected = head.state_dict()
    for key in expected:
        if key not in source:
            raise ValueError(f"missing key {key!r} in {source.describe()}")
        if tuple(source[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"shape mismatch for {key!r} in {source.describe()}: checkpoint "
                f"{list(source[key].shape)}, head {list(expected[key].shape)}"
            )
    extra = sorted(set(source) - set(expected))
    if extra:
        raise ValueError(f"unexpected key {extra[0]!r} in {source.describe()}")
    raw = {k: source[k] for k in expected}
    for key, tensor in raw.items():
        check_floating(key, tensor, source.describe())  # before the cast would hide an integer tensor
    state = checked_weights({k: v.to(torch.float32) for k, v in raw.items()}, source.describe(), torch.float32)
    # the sizes agree with the file: allocate
    head = RewardHead(len(reward.layers), dim, reward.head_hidden, reward.head_outputs)
    head.load_state_dict(state)  # (copied into fresh parameters, not adopted from the file's buffer)
    return head
