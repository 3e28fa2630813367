"""Training of DiT-Reward (DESIGN.md Eq. 1-6) on cached latents and text embeddings.

    python -m training.train --config run.json [key=value ...]               # one process
    torchrun --nproc_per_node 8 -m training.train --config run.json            # FSDP2, one block per shard unit

Modes: ``full`` fine-tunes the backbone and the head (fresh noise every step at the configured t); ``lora`` trains
LoRA adapters on the blocks' projections and the head, and exports the adapters merged into plain backbone weights;
``frozen`` runs the backbone once per image (fixed, seeded noise), caches the pooled features and trains only the head
(seconds). Losses (`training.losses`): ``bt`` (Eq. 6), ``uncertainty`` (the head predicts a mean and a log-std per
image) and ``btt`` (ties from the records' ``choice_dist``).

Everything a step consumes is a pure function of (config, step): the pairs (`training.buckets.BucketSampler`: batches
of one (winner bucket, loser bucket) combination where possible), the noise (streams of a seed derived from the step)
and the learning rate (`get_lr`). A step's `batch_size` pairs are split over the processes and, within a process, over
`grad_accum_steps` micro-batches whose mean losses are averaged: the update equals one batch of `batch_size` pairs.
Images of several sizes run one forward per latent shape (`training.batching`); under FSDP2 the ranks' k-th
micro-batches run the same shapes in one order. A checkpoint (`training.checkpoint`) therefore needs only the trainable
weights, the optimizer state and the step, and a resumed run equals an uninterrupted one. One run at a time holds
``out_dir/.lock``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field

from engine.io.atomic import reporting_disk_full
from engine.io.backbone import base_source
from engine.io.checkpoint import check_replaceable
from engine.io.files import is_regular_file
from engine.schema import Schema, parse_cli
from training.batching import pair_forward, rank_positions
from training.buckets import BucketSampler
from training.cache import LatentCache
from training.checkpoint import (
    check_resumable,
    check_same_data,
    data_fingerprint,
    export,
    latest_checkpoint,
    restore,
    save_checkpoint,
    truncate_log,
)
from training.config import TrainConfig, load_config
from training.data import PreferencePair, load_pairs, read_file
from training.distributed import Dist, all_mean, setup_distributed, shard
from training.ema import EMA
from training.evaluation import accuracy, pair_rewards
from training.files import exclusive_lock
from training.losses import HEAD_OUTPUTS, bt_loss, btt_loss, thurstone_loss, tied_mask, uncertainty_loss
from training.model import TrainableReward, build_engine
from training.noise_levels import pair_levels

# ----------------------------------------------------------------------------------------------------- schedule


def get_lr(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup over warmup_ratio * steps, then cosine decay
    to min_lr_ratio at the last step, or constant. Each parameter group's lr is its base lr times this."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_noise_seed(step: int, seed: int) -> int:
    """Seed of training step `step`'s fresh eps: image k of the GLOBAL batch (pair k // 2's winner for even k, loser
    for odd) uses stream k of it (`kernels.noise.noise_ref`), so the noise depends on neither the number of ranks nor
    the other images' sizes."""
    return seed * 1_000_003 + step + 1


def detect_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (FLOP/s per device); None elsewhere (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
    return next((v for k, v in table.items() if k in name), None)


# -------------------------------------------------------------------------------------------------------- train


def non_finite_pairs(micro_batches: list[tuple[list[int], torch.Tensor]], step_pairs: list[int]) -> list[int]:
    """The pairs (training indices) of a step's micro-batches whose predictions are not all finite (read only when the
    step failed: a device sync), else all the step's pairs."""
    found = [i for indices, finite in micro_batches for i, ok in zip(indices, finite.tolist(), strict=True) if not ok]
    return found or list(step_pairs)


def preference_loss(
    loss: str, winners: torch.Tensor, losers: torch.Tensor, ties: torch.Tensor, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean `loss` over pairs: winners, losers [b, head_outputs] head predictions (reward, or mean and log-std);
    ties [b] bool (read by ``btt`` only); sigma [b] each pair's noise level (read by the Thurstone losses)."""
    if loss in ("thurstone", "thurstone_nll"):
        if sigma is None:
            raise ValueError(f"loss {loss!r} reads each pair's noise level: pass sigma [b]")
        return thurstone_loss(winners[:, 0], losers[:, 0], sigma, nll=loss == "thurstone_nll")
    if loss == "uncertainty":
        return uncertainty_loss(winners[:, 0], winners[:, 1], losers[:, 0], losers[:, 1])
    if loss == "btt":
        return btt_loss(winners[:, 0], losers[:, 0], ties)
    return bt_loss(winners[:, 0], losers[:, 0])


def pair_ties(pairs: list[PreferencePair], tied_threshold: float) -> torch.Tensor:
    """[n] bool: pairs whose annotators' ``choice_dist`` is balanced within `tied_threshold`; a pair without one is
    decided."""
    votes = torch.tensor([p.choice_dist or (1.0, 0.0) for p in pairs], dtype=torch.float64).view(-1, 2)
    return tied_mask(votes, tied_threshold) & torch.tensor([p.choice_dist is not None for p in pairs], dtype=torch.bool)


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient is not finite; the run stops before that step updates anything."""


def check_finite(
    step: int,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    suspects: Callable[[], list[int]],
    pairs: list[PreferencePair],
    d: Dist,
) -> None:
    """Stop the run at optimizer step `step` (0-based) unless its loss (summed over micro-batches) and global gradient
    norm are finite; one device sync per step. The error names the step, the pairs (index into the training pairs,
    file and record) and says that the last checkpoint is untouched. `suspects`: this rank's pairs of the step whose
    predictions are not finite, else all of the step's pairs (called only when the step failed)."""
    health = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)])
    health = all_mean(health, d)  # a non-finite value on any rank makes the mean non-finite on every rank
    if bool(torch.isfinite(health).all()):
        return
    value, norm = health.tolist()
    suspects = suspects()
    shown = ", ".join(f"{i} ({pairs[i].source} record {pairs[i].index})" for i in suspects[:8])
    raise NonFiniteError(
        f"step {step + 1}: the loss is {value} and the gradient norm {norm}: training stopped before this step "
        f"updated the weights; the checkpoints already written are intact. Training pairs of this step"
        f"{' with non-finite predictions' if d.world == 1 else ''}: {shown}{' ...' if len(suspects) > 8 else ''}. "
        "Check those pairs' cached latents, lower the learning rates, or resume from the last checkpoint with other "
        "settings"
    )


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics. `on_step(step, metrics)` runs after every step (and its
    checkpoint), e.g. to stop a run early in tests. `cfg` is validated as it is built; the rules that depend on the
    base run here, before any work."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig (training.config), got {type(cfg).__name__}")
    cfg.check_against_base(base_source(cfg.base)[0])
    d = setup_distributed(cfg.device)
    if cfg.mode == "frozen" and d.world > 1:
        raise ValueError("mode='frozen' trains only the head (seconds on one device); run it without torchrun")
    if cfg.batch_size % (d.world * cfg.grad_accum_steps):  # (the schema checks grad_accum_steps; this the processes)
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum_steps = {d.world} x "
            f"{cfg.grad_accum_steps}: each micro-batch holds batch_size / (processes x grad_accum_steps) pairs"
        )
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One run per out_dir: rank 0 holds the lock until train() returns or raises (ranks of one run share out_dir).
    with exclusive_lock(out_dir, "another training run") if d.main else contextlib.nullcontext():
        return _train(cfg, d, out_dir, on_step)


def _train(cfg: TrainConfig, d: Dist, out_dir: Path, on_step: Callable[[int, dict], None] | None) -> dict[str, Any]:
    log = print if d.main else (lambda *a, **k: None)
    if d.main:  # a crashed writer's temp checkpoints: never read, each as large as a checkpoint
        for stale in (out_dir / "checkpoints").glob(".step_*.tmp-*"):
            stale.unlink(missing_ok=True)
    check_replaceable(  # refused now, not after every step has run
        out_dir / "reward",
        "the export at the end of training would have to replace them: move them away or use another out_dir",
    )

    # Cheap checks of the base (in train()) and the cache first: reading the data files (a symlink-resolving path per
    # image) is the slow part.
    cache = LatentCache(cfg.cache)

    # Data: pairs from the JSON files, tensors from the cache.
    # Bad images as the cache found them (it decoded every image once): nothing is decoded again here.
    roots = {"image_root": cfg.image_root, "allow_outside_root": cfg.allow_outside_root}
    roots["image_check"] = cache.image_problem
    pairs, report = load_pairs(cfg.train_json, cfg.confidence_threshold, cfg.on_bad_image, cfg.seed, **roots)
    val_sets = {str(p): read_file(p, None, cfg.on_bad_image, **roots) for p in cfg.val_json}  # every pair counts
    empty = [name for name, val_pairs in val_sets.items() if not val_pairs]
    if empty:
        raise ValueError(
            f"validation file(s) {empty} hold no pairs (no records, or every record skipped by on_bad_image='skip'): "
            "each val_json file needs at least one pair"
        )
    cache.check(pairs + [p for v in val_sets.values() for p in v])
    log(f"train pairs: {len(pairs)}\n{report}\nval pairs: {sum(map(len, val_sets.values()))}")
    ties = pair_ties(pairs, cfg.tied_threshold)
    if cfg.loss == "btt":
        log(f"btt: {int(ties.sum())} of {len(pairs)} training pairs are ties (tied_threshold {cfg.tied_threshold})")
    fingerprint = data_fingerprint(cfg, pairs, val_sets, cache)
    found = latest_checkpoint(out_dir)  # its config and data are checked here; its state is restored below
    if found is not None:
        check_resumable(found[1]["config"], cfg, found[0])
        check_same_data(found[1]["fingerprint"], fingerprint, cfg, found[0])

    # Batches of one (winner bucket, loser bucket) combination where possible, from the shared seed: the same on every
    # rank and a pure function of the step (exact on resume). Built before the model: too few
    # pairs for one batch is refused without loading it.
    # Validation noise levels: the stored t (val_accuracy, the reward statistics) first, then val_t's others.
    val_levels = list(dict.fromkeys([cfg.t, *(cfg.val_t or [])]))
    pair_keys = [cache.pair_key(p) for p in pairs]
    sampler = BucketSampler(pair_keys, cfg.batch_size, cfg.seed)
    slots = d.world * cfg.grad_accum_steps  # forwards per step over all ranks

    # Model: same seed on every rank, so the freshly initialised head (and LoRA's A) is identical before sharding.
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg, d.device)
    engine.head.requires_grad_(True)
    model = TrainableReward(engine, cfg.grad_checkpointing)
    model.train()
    backbone_trains = cfg.mode != "frozen"
    # A frozen backbone's features are computed once when no step changes them (a mean-pool head at the one t);
    # otherwise the frozen backbone runs in every step and only the head trains.
    cached_features = not backbone_trains and cfg.head == "mean_pool" and cfg.t_sampling == "fixed"
    fixed_t = cfg.t_sampling == "fixed"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext()

    def load_batch(step: int, micro_step: int) -> dict[str, Any]:
        chosen = sampler.batch(step)  # the global batch
        keys = [pair_keys[i] for i in chosen]
        # Micro-step m of rank r takes slot m * world + r of the global batch dealt by key (`rank_positions`): the
        # ranks' m-th forwards hold the same number of pairs and share one shape schedule (FSDP2).
        positions = rank_positions(keys, micro_step * d.world + d.rank, slots)
        indices = [chosen[k] for k in positions]
        levels = pair_levels(cfg, step)  # [batch_size] per global pair, or None: every pair at cfg.t
        t = torch.full((len(indices),), cfg.t) if levels is None else levels[torch.tensor(positions, dtype=torch.long)]
        batch = {"indices": indices, "ties": ties[indices].to(d.device), "t": t.to(d.device)}
        if cached_features:
            return batch
        together = [k for r in range(d.world) for k in rank_positions(keys, micro_step * d.world + r, slots)]
        images = [image for k in together for image in (pairs[chosen[k]].winner, pairs[chosen[k]].loser)]
        return batch | {
            **cache.batch([pairs[i] for i in indices]),
            # global image numbers, interleaved; a noise-aware pair's two images share one stream (one eps draw)
            "streams": [2 * k + (side if fixed_t else 0) for k in positions for side in (0, 1)],
            "schedule": sorted({cache.latent_shape(image) for image in images}),
        }

    if not cached_features:

        def step_predictions(step: int, batch: dict[str, Any]) -> torch.Tensor:
            """Head predictions [2, b, head_outputs] (winners, losers) of one micro-batch, fresh noise at t; one
            forward per latent shape of the schedule."""
            with autocast:
                p = pair_forward(
                    model,
                    batch["winners"],
                    batch["losers"],
                    batch["prompt_embeds"],
                    batch["pooled"],
                    seed=step_noise_seed(step, cfg.seed),
                    streams=batch["streams"],
                    schedule=batch["schedule"],
                    device=d.device,
                    t=None if fixed_t else batch["t"],
                )  # [b, 2, head_outputs]
            return p.transpose(0, 1)

        def validation_rewards(name: str, t: float) -> torch.Tensor:
            model.eval()
            with autocast:
                reward = lambda *a, **k: model(*a, t=t, **k)[:, 0]  # the mean of an uncertainty head
                r = pair_rewards(reward, val_sets[name], cache, cfg.eval_batch_size, cfg.eval_seed, d.device)
            model.train()
            return r
    else:
        # Frozen backbone: one forward per pair, fixed noise (train: seed, val: eval_seed as bench.accuracy does).
        def features(file_pairs: list[PreferencePair], seed: int, t: float) -> torch.Tensor:  # [n, 2, n_layers, D]
            with autocast:
                f = pair_rewards(
                    lambda z0, embeds, pooled, noise: model.features(z0, embeds, pooled, noise=noise, t=t).flatten(1),
                    file_pairs,
                    cache,
                    cfg.eval_batch_size,
                    seed,
                    d.device,
                )
            return f.view(len(file_pairs), 2, len(model.layers), -1)

        train_features = features(pairs, cfg.seed, cfg.t)
        val_features = {(name, t): features(v, cfg.eval_seed, t) for name, v in val_sets.items() for t in val_levels}

        def step_predictions(step: int, batch: dict[str, Any]) -> torch.Tensor:
            f = train_features[torch.tensor(batch["indices"])].to(d.device)  # [b, 2, L, D]
            return model.head.predict(f.transpose(0, 1).flatten(0, 1)).view(2, f.shape[0], -1)

        def validation_rewards(name: str, t: float) -> torch.Tensor:
            with torch.no_grad():
                return model.head.predict(val_features[name, t].flatten(0, 1).to(d.device))[:, 0].view(-1, 2).cpu()

    # Model FLOPs per step, measured once before sharding: 3x the forward (backward ~ 2x forward), the MFU convention.
    from torch.utils.flop_counter import FlopCounterMode

    # With no parameter requiring grad during the count: FlopCounterMode's module tracker fails on a parameter's view
    # made under no_grad (the query-attention head's expanded queries), which requires grad but has no grad_fn.
    trains = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step_predictions(0, load_batch(0, 0))
    for p in trains:
        p.requires_grad_(True)
    step_flops = 3 * counter.get_total_flops() * cfg.grad_accum_steps
    peak = cfg.peak_flops or detect_peak_flops(d.device)

    if d.world > 1:
        shard(model, d.world, d.device)
    backbone_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head}]
    if backbone_trains:  # the whole backbone, or its LoRA adapters
        groups.insert(0, {"params": backbone_params, "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone})
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    log(f"trainable parameters: {trainable / 1e6:.3f} M ({cfg.mode}, head outputs {HEAD_OUTPUTS[cfg.loss]})")

    if cfg.ema_decay is not None and d.world > 1:
        raise ValueError("ema_decay averages unsharded weights: run it in one process (without torchrun) or unset it")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    step = 0
    if found is not None:
        path, payload = found
        step = restore(model, optimizer, payload, ema)
        log(f"resumed from {path} (step {step}, data position {payload['data_position']})")
        found = payload = None  # the restored state lives in the model and optimizer now

    def evaluate() -> dict[str, Any]:
        """Validation at every level of val_levels (with the EMA weights when ema_decay is set); the headline figures
        at cfg.t, and with val_t a row per (file, t) in val_accuracy_per_t."""
        with ema.applied() if ema is not None else contextlib.nullcontext():
            rewards = {(name, t): validation_rewards(name, t) for t in val_levels for name in val_sets}
        per_file = {name: accuracy(rewards[name, cfg.t]) for name in val_sets}
        everything = torch.cat([rewards[name, cfg.t] for name in val_sets])
        metrics = {
            "val_accuracy": accuracy(everything),  # over all validation pairs
            "val_accuracy_mean": sum(per_file.values()) / len(per_file),  # over files, each file counting once
            "val_accuracy_per_file": per_file,
            "reward_mean": float(everything.mean()),
            "reward_std": float(everything.std()),
        }
        if cfg.val_t is not None:
            metrics["val_accuracy_per_t"] = [
                {"file": name, "t": t, "accuracy": accuracy(rewards[name, t])} for t in val_levels for name in val_sets
            ]
        return metrics

    def log_line(metrics: dict[str, Any]) -> None:
        log(
            " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in metrics.items()
                if k not in ("val_accuracy_per_file", "val_accuracy_per_t")
            )
        )
        for name, value in metrics.get("val_accuracy_per_file", {}).items():
            log(f"  val_accuracy {value:.4f}  {name}")
        for row in metrics.get("val_accuracy_per_t", []):
            log(f"  val_accuracy {row['accuracy']:.4f}  t {row['t']:g}  {row['file']}")
        if log_file is not None:
            line = json.dumps(metrics) + "\n"
            with reporting_disk_full(log_path, len(line)):
                log_file.write(line)
                log_file.flush()

    log_path = out_dir / "log.jsonl"
    if d.main:
        truncate_log(log_path, step)
        is_regular_file(log_path, "training log")  # a FIFO there is refused by name instead of opened for writing
    log_file = open(log_path, "a") if d.main else None  # noqa: SIM115 (open for the whole run)
    metrics: dict[str, Any] = {}
    if step == 0:  # the untrained baseline (~50%), logged as step 0
        metrics = {"step": 0, **evaluate()}
        log_line(metrics)
    window = {"loss": 0.0, "correct": 0.0, "t0": time.perf_counter(), "steps": 0}
    while step < cfg.steps:
        scale = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        optimizer.zero_grad(set_to_none=True)
        step_loss, predicted = torch.zeros((), device=d.device), []
        for micro_step in range(cfg.grad_accum_steps):
            last = micro_step == cfg.grad_accum_steps - 1
            if d.world > 1:  # FSDP2 reduce-scatters gradients on the last micro-step only
                model.set_requires_gradient_sync(last)
            batch = load_batch(step, micro_step)
            p = step_predictions(step, batch)  # [2, b, head_outputs]
            # each micro-batch's mean loss / k: the k micro-steps sum to the mean over the whole batch
            loss = preference_loss(cfg.loss, p[0], p[1], batch["ties"], batch["t"]) / cfg.grad_accum_steps
            loss.backward()
            step_loss += loss.detach()
            window["loss"] += loss.detach()
            window["correct"] += (p[0, :, 0] > p[1, :, 0]).float().mean().detach() / cfg.grad_accum_steps
            predicted.append((batch["indices"], torch.isfinite(p).all(-1).all(0)))  # [b] per pair (no sync)
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        check_finite(step, step_loss, grad_norm, lambda: non_finite_pairs(predicted, sampler.batch(step)), pairs, d)
        optimizer.step()
        if ema is not None:
            ema.update()
        step += 1
        window["steps"] += 1

        metrics = {"step": step}
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_acc = all_mean(torch.stack([window["loss"], window["correct"]]).float() / window["steps"], d)
            elapsed = time.perf_counter() - window["t0"]  # the all_reduce / .tolist() above synchronised the device
            loss_value, acc_value = loss_acc.tolist()
            metrics |= {"loss": loss_value, "accuracy": acc_value, "lr_head": cfg.lr_head * scale}
            if backbone_trains:
                metrics["lr_backbone"] = cfg.lr_backbone * scale
            metrics["pairs_per_s"] = window["steps"] * cfg.batch_size / elapsed
            metrics["mfu"] = step_flops * window["steps"] / elapsed / peak if peak else None
            window = {"loss": 0.0, "correct": 0.0, "t0": time.perf_counter(), "steps": 0}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            metrics |= evaluate()
        if len(metrics) > 1:
            log_line(metrics)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            save_checkpoint(model, optimizer, step, cfg, d, fingerprint, ema)
        if on_step is not None:
            on_step(step, metrics)

    if "val_accuracy" not in metrics:  # resumed at the last step: nothing ran, evaluate for the export
        metrics |= evaluate()
    with ema.applied() if ema is not None else contextlib.nullcontext():  # the exported reward is the average
        export(engine, model, cfg, metrics, d, cache.settings)
    if log_file is not None:
        log_file.close()
    return metrics


class TrainFlags(Schema):
    config: str | None = Field(
        None, min_length=1, description="JSON file of TrainConfig fields (defaults and reasons in training/config.py)"
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="key=value overrides, e.g. steps=100 mode=frozen",
        json_schema_extra={"cli": {"positional": True}},
    )


def main(argv: list[str] | None = None) -> None:
    flags = parse_cli(TrainFlags, argv, "python -m training.train", __doc__.split("\n\n")[0])
    train(load_config(flags.config, flags.overrides))
    if dist.is_initialized():
        dist.barrier()  # every rank done with every collective before any rank tears its process group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()


__all__ = ["get_lr", "main", "pair_ties", "preference_loss", "step_noise_seed", "train"]
