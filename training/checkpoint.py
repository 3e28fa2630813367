"""Resumable training checkpoints and the final reward export.

A checkpoint is one safetensors file (tensors) with its structure, the config and the data fingerprint as JSON
metadata: resume never unpickles anything. Files are written to a temp file and ``os.replace``d; resume takes the
newest one that loads. The fingerprint (the JSON files' content hashes, the kept pairs, the cache) refuses a resume on
other data unless ``resume_on_changed_data``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from engine.api import RewardEngine
from engine.io.atomic import atomic_write, atomic_write_text, reporting_disk_full
from engine.io.files import is_regular_file, read_bytes
from training.cache import LatentCache
from training.config import TrainConfig, defaults
from training.data import PreferencePair, file_digest, parse_sources
from training.distributed import Dist
from training.files import open_safetensors
from training.lora import merge_lora, save_adapter
from training.model import TrainableReward, build_engine


def state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


CHECKPOINT_FORMAT = "dit-reward-train-state/1"
CHECKPOINT_SUFFIX = ".safetensors"


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dicts/lists/tuples of tensors and JSON scalars -> a JSON tree whose tensors are names in `tensors`.
    Dict keys keep their type (str or int: optimizer states key parameters either way)."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError(f"checkpoint state has dict keys {list(value)[:5]}; only str and int keys are stored")
        return {"dict": [[k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"checkpoint state holds a {type(value).__name__}; only tensors, containers and scalars are stored")


def _unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, body), *rest = node.items() if isinstance(node, dict) else [(None, None)]
    if rest or kind not in ("tensor", "dict", "list", "tuple", "value"):
        raise ValueError(f"unexpected checkpoint structure node {str(node)[:80]}")
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_unpack(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    return body


def write_checkpoint_file(path: Path, payload: dict[str, Any]) -> None:
    """`payload` (tensors in nested containers, JSON scalars) as one safetensors file, atomically; a full disk is a
    `DiskFullError` with the bytes needed."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _pack(payload, tensors)
    metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(tree)}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + len(metadata["state"]) + 100 * len(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), nbytes)


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of `write_checkpoint_file`. Only safetensors and JSON are parsed: nothing is unpickled, and only a
    regular file is opened (a FIFO at a checkpoint's name would block forever)."""
    with open_safetensors(Path(path), "training checkpoint") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    payload = _unpack(json.loads(metadata["state"]), tensors)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: the stored state is a {type(payload).__name__}, expected a dict")
    return payload


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, d: Dist, fingerprint: dict
) -> None:
    """Trainable weights, optimizer state, step/data position, RNG states and the data fingerprint, gathered to rank 0
    and written atomically (`write_checkpoint_file`): a crash mid-write leaves only a temp file, which resume
    ignores."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Frozen parameters (the backbone in lora and frozen mode) are never gathered; buffers still are (the backbone's
    # pos_embed), and only the trainable parameters are kept.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=state_options(ignore_frozen_params=True))  # collective under FSDP
    optim_state = get_optimizer_state_dict(model, optimizer, options=state_options())
    if d.main:
        directory = Path(cfg.out_dir) / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": step,
            "data_position": step * cfg.batch_size,
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "model": {k: v for k, v in state.items() if k in trainable},
            "optimizer": optim_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        write_checkpoint_file(directory / f"step_{step:08d}{CHECKPOINT_SUFFIX}", payload)
        # Prune among the checkpoints up to this step, so the one just written is always kept. A later step's file
        # is one that resume skipped as unreadable (else it would have resumed from it): it never counts as kept, and
        # is replaced or pruned once the run gets there.
        for old in [path for s, path in checkpoint_files(directory) if s <= step][: -cfg.keep_checkpoints]:
            old.unlink()
    if d.world > 1:
        dist.barrier()  # no rank runs ahead of a checkpoint another rank might resume from


def checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the ``step_N.safetensors`` files in `directory`, oldest first: ordered by step, not by name.
    Temp files (".step_N.safetensors.tmp-PID") never match."""
    found = [(path.name[len("step_") : -len(CHECKPOINT_SUFFIX)], path) for path in directory.glob("step_*.safetensors")]
    return sorted((int(digits), path) for digits, path in found if digits.isdigit())


def latest_checkpoint(out_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint under out_dir/checkpoints that loads completely; temp files are never considered and a
    damaged or foreign file is skipped with a message. Files of other formats (a ``.pt`` pickle) are never opened:
    unpickling a file can run code."""
    directory = Path(out_dir) / "checkpoints"
    for path in sorted(directory.glob("step_*.pt")):
        print(
            f"ignoring {path}: pickled checkpoints are never loaded (unpickling can run code); resume reads "
            "step_N.safetensors"
        )
    for _, path in reversed(checkpoint_files(directory)):
        try:
            payload = read_checkpoint_file(path)
            missing = {"step", "model", "optimizer", "rng", "config", "fingerprint"} - set(payload)
            if not missing:
                return path, payload
            print(f"skipping checkpoint {path}: it lacks {sorted(missing)}")
        except Exception as e:  # truncated or foreign file: fall back to an older checkpoint
            print(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None


def truncate_log(path: Path, step: int) -> None:
    """Cut log.jsonl back to what a run resumed at `step` does not write again: the lines up to `step`, none when the
    run starts over (step 0 is evaluated again). A line torn by a kill goes too. The first line after a resume still
    averages loss/accuracy over the steps since the resume only, not over the whole log window."""
    if not is_regular_file(path, "training log"):
        return
    kept = []
    for line in read_bytes(path, "training log").decode("utf-8", errors="replace").splitlines():
        try:
            logged = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if step > 0 and isinstance(logged, int) and logged <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# Fields that only change bookkeeping; any other difference would make the resumed run a different run.
_RESUME_FREE = {
    "out_dir",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "peak_flops",
    "eval_batch_size",
    "resume_on_changed_data",
    "save_adapter",
}
# The data fields: a run told to resume on changed data (resume_on_changed_data) may change them.
_DATA_FIELDS = {
    "train_json",
    "val_json",
    "confidence_threshold",
    "on_bad_image",
    "image_root",
    "allow_outside_root",
    "cache",
}


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    saved = defaults() | saved  # a field the checkpoint predates had its default then
    free = _RESUME_FREE | (_DATA_FIELDS if cfg.resume_on_changed_data else set())
    if cfg.mode == "frozen":  # the training features are extracted in eval_batch_size batches too: another batching
        free = free - {"eval_batch_size"}  # changes them in the last bit, and the resumed head would differ
    changed = sorted(k for k in current if k not in free and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"cannot resume from {path}: config fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} }); restore them or use a new out_dir"
        )


def data_fingerprint(
    cfg: TrainConfig, pairs: list[PreferencePair], val_sets: dict[str, list[PreferencePair]], cache: LatentCache
) -> dict[str, str]:
    """What the training inputs were: each data file's sha256, digests of the kept training and validation pairs (the
    filters' and the image root's effect), of the contents of their images (the sha256 of each file's bytes as the
    cache read it) and the cache's own fingerprint."""
    digest = lambda value: hashlib.sha256(json.dumps(value).encode()).hexdigest()
    kept = lambda ps: digest(
        [[p.source, p.index, str(p.winner), str(p.loser), p.prompt, p.confidence, p.choice_dist] for p in ps]
    )
    out = {f"train_json {path.resolve()}": file_digest(path) for path, _ in parse_sources(cfg.train_json)}
    out |= {f"val_json {Path(path).resolve()}": file_digest(path) for path in cfg.val_json}
    out["training pairs"] = kept(pairs)
    out["validation pairs"] = kept([p for v in val_sets.values() for p in v])
    used = sorted({str(image) for ps in [pairs, *val_sets.values()] for p in ps for image in (p.winner, p.loser)})
    out["image contents"] = digest([[image, cache.digests[image]] for image in used])
    out["cache"] = cache.fingerprint
    return out


def check_same_data(saved: dict[str, str], current: dict[str, str], cfg: TrainConfig, path: Path) -> None:
    """ValueError naming what changed between the checkpoint's data fingerprint and this run's, unless
    `cfg.resume_on_changed_data` (then a printed note)."""
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if not changed:
        return
    status = lambda k: "not in this run" if k not in current else "new in this run" if k not in saved else "changed"
    what = "; ".join(f"{k}: {status(k)}" for k in changed)
    if cfg.resume_on_changed_data:
        print(f"resuming from {path} on changed data (resume_on_changed_data): {what}")
        return
    raise ValueError(
        f"cannot resume from {path}: the training inputs changed since it was written ({what}); the resumed run would "
        "see another data order. Restore the data, use a new out_dir, or set resume_on_changed_data=true to continue "
        "anyway"
    )


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict) -> int:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, payload["model"], options=state_options(strict=False))
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=state_options())
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return int(payload["step"])


def export(
    engine: RewardEngine,
    model: TrainableReward,
    cfg: TrainConfig,
    metrics: dict,
    d: Dist,
    cache_settings: dict[str, Any],
) -> Path:
    """The final reward checkpoint (out_dir/reward) via `engine.save_pretrained`, with the validation reward mean/std
    (for `score(normalize=True)`), the per-file validation accuracy and what bench.accuracy needs to reproduce the
    validation (`cache_settings`: the training cache's `LatentCache.settings`). A LoRA run's adapters are merged into
    the backbone weights (the checkpoint loads without peft); `save_adapter` also writes them alone to out_dir/adapter
    in peft's or diffusers' layout (`save_adapter_format`)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=state_options())  # collective under FSDP
    target = Path(cfg.out_dir) / "reward"
    if d.main:
        if d.world > 1:  # the engine's modules hold shards now: write from an unsharded copy of the final weights
            engine = build_engine(cfg)
            TrainableReward(engine).load_state_dict(state)
        if cfg.mode == "lora":
            if cfg.save_adapter:
                adapter = Path(cfg.out_dir) / "adapter"
                trained = [p for p in engine.backbone.parameters() if p.requires_grad]  # the adapters
                lora = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
                with reporting_disk_full(adapter, sum(p.numel() * p.element_size() for p in trained)):
                    save_adapter(engine.backbone, adapter, *lora, format=cfg.save_adapter_format)
            merge_lora(engine.backbone)
        engine.reward_config = engine.reward_config.replace(
            reward_mean=metrics["reward_mean"], reward_std=max(metrics["reward_std"], 1e-6)
        )
        engine.save_pretrained(
            target,
            include_backbone=cfg.mode != "frozen",
            training={
                "mode": cfg.mode,
                "loss": cfg.loss,
                **({"tied_threshold": cfg.tied_threshold} if cfg.loss == "btt" else {}),
                **(
                    {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": cfg.lora_targets}
                    if cfg.mode == "lora"
                    else {}
                ),
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "grad_accum_steps": cfg.grad_accum_steps,
                "eval_seed": cfg.eval_seed,
                "val_accuracy": metrics["val_accuracy"],
                "val_accuracy_mean": metrics["val_accuracy_mean"],
                "val_accuracy_per_file": metrics["val_accuracy_per_file"],
                "max_sequence_length": cache_settings["max_sequence_length"],
                "area": cache_settings["area"],
                "cache_dtype": cache_settings["dtype"],
            },
        )
        print(f"reward checkpoint: {target} (val accuracy {metrics['val_accuracy']:.4f})")
    if d.world > 1:
        dist.barrier()
    return target


__all__ = [
    "check_resumable",
    "check_same_data",
    "data_fingerprint",
    "export",
    "latest_checkpoint",
    "read_checkpoint_file",
    "restore",
    "save_checkpoint",
    "state_options",
    "truncate_log",
    "write_checkpoint_file",
]
