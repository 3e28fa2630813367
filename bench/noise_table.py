"""Accuracy per noise level of fixed-t and noise-aware heads on the CPU.

    python -m bench.noise_table [--json bench/results/accuracy/noise_table_cpu.json] [--n-train 512] [--steps 300]

Builds the mixed-size demo set (`training.make_demo_set`) and its cache on the tiny base (`bench.tiny_base`, random
weights), then trains four heads, {fixed t = 0.1, uniform t} x {mean_pool, query_attention}, on the frozen backbone
(--mode lora or full: the backbone trains too) with the same loss, steps and data, and validates each at every --t
(the same validation noise at every level). Prints one row per head with its accuracy per t (the mean over the two
validation files) and writes every figure, per file too, with the machine, versions, commit and date to --json. The
backbone is random: the figures compare training rules on one task, not a trained reward's quality.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from bench.harness import environment_info
from bench.tiny_base import default_tiny_base
from engine.schema import Schema, parse_cli
from training.cache import build_cache
from training.make_demo_set import make_demo_set
from training.train import TrainConfig, train

AREA = 64 * 64  # the demo set's buckets on the tiny base: latents of 4x16 .. 16x4
RUNS = [(sampling, head) for sampling in ("fixed", "uniform") for head in ("mean_pool", "query_attention")]
HEADS: dict[str, dict[str, Any]] = {
    "mean_pool": {"head_hidden": [64]},
    "query_attention": {"text_layers": [1], "query_attention": {"width": 32, "num_heads": 4, "num_queries": 4}},
}


class NoiseTableArgs(Schema):
    json_out: str = Field(
        "bench/results/accuracy/noise_table_cpu.json",
        min_length=1,
        description="where the results go",
        json_schema_extra={"cli": {"flag": "--json"}},
    )
    n_train: int = Field(512, ge=8, le=100000, description="training pairs of the demo set")
    n_val: int = Field(96, ge=2, le=100000, description="pairs of each of the two validation files")
    mode: Literal["frozen", "lora", "full"] = Field(
        "frozen", description='"frozen": heads on the random backbone; "lora"/"full": the backbone trains too'
    )
    lr_backbone: float = Field(1e-3, ge=0.0, le=1.0, description="lora/full: the backbone's (the README's demo run)")
    steps: int = Field(300, ge=1, le=1000000, description="optimizer steps per head")
    batch_size: int = Field(16, ge=2, le=4096, description="pairs per step")
    lr_head: float = Field(3e-3, gt=0.0, le=1.0, description="the heads start from random init")
    loss: Literal["bt", "thurstone"] = Field("thurstone", description="the same loss for every head")
    t: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1, max_length=64, description="levels reported"
    )
    fixed_t: float = Field(0.1, gt=0.0, lt=1.0, description="the fixed-t heads' level (DiT-Reward's default)")
    t_min: float = Field(0.05, gt=0.0, lt=1.0, description="the uniform-t heads' range")
    t_max: float = Field(0.95, gt=0.0, lt=1.0, description="the uniform-t heads' range")
    seed: int = Field(0, ge=0, lt=2**32, description="data set, head init, data order and noise")
    work_dir: str | None = Field(None, min_length=1, description="data, cache and runs (default: a temp dir)")


def run(args: NoiseTableArgs) -> dict[str, Any]:
    """Train the four heads and return the report (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="noise_table_") as tmp:
        root = Path(args.work_dir or tmp)
        start = time.perf_counter()
        demo = make_demo_set(root / "demo", n_train=args.n_train, n_val=(args.n_val, args.n_val), seed=args.seed)
        base = default_tiny_base()
        cache = build_cache(
            [demo["train"]], base, root / "cache", max_sequence_length=16, shard_size=256, area=AREA,
            progress=False, val_json=demo["val"], image_root=demo["image_root"],
        )  # fmt: skip
        data_seconds = time.perf_counter() - start
        common = {
            "cache": str(cache), "train_json": [demo["train"]], "val_json": demo["val"], "base": str(base),
            "image_root": demo["image_root"], "mode": args.mode, "lr_backbone": args.lr_backbone,
            "loss": args.loss, "steps": args.steps, "batch_size": args.batch_size, "lr_head": args.lr_head,
            "t": args.fixed_t, "t_min": args.t_min, "t_max": args.t_max, "val_t": args.t, "seed": args.seed,
            "log_every": max(1, args.steps // 5), "checkpoint_every": 0, "eval_batch_size": 64,
        }  # fmt: skip
        runs = []
        for sampling, head in RUNS:
            cfg = TrainConfig(
                **common, **HEADS[head], head=head, t_sampling=sampling, out_dir=str(root / f"{sampling}_{head}")
            )
            begin = time.perf_counter()
            metrics = train(cfg)
            rows = [r for r in metrics["val_accuracy_per_t"] if r["t"] in args.t]
            per_t = {t: [r["accuracy"] for r in rows if r["t"] == t] for t in args.t}
            runs.append(
                {
                    "t_sampling": sampling,
                    "head": head,
                    "seconds": time.perf_counter() - begin,
                    "accuracy": {f"{t:g}": sum(a) / len(a) for t, a in per_t.items()},  # mean over the files
                    "per_file": [{**r, "file": Path(r["file"]).name} for r in rows],
                }
            )
    return {
        "what": "pairwise accuracy per noise level t of heads on the random tiny base (mixed-size demo set)",
        "environment": environment_info("cpu"),
        "settings": args.to_dict() | {"work_dir": None, "area": AREA, "heads": HEADS},
        "data_seconds": data_seconds,
        "runs": runs,
    }


def format_table(report: dict[str, Any]) -> str:
    levels = list(report["runs"][0]["accuracy"])
    rows = [("t_sampling", "head", *(f"t={t}" for t in levels), "train s")]
    rows += [
        (r["t_sampling"], r["head"], *(f"{100 * r['accuracy'][t]:.1f}%" for t in levels), f"{r['seconds']:.0f}")
        for r in report["runs"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(NoiseTableArgs, argv, "python -m bench.noise_table", __doc__.split("\n\n")[0])
    report = run(args)
    print(format_table(report))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()


__all__ = ["NoiseTableArgs", "format_table", "main", "run"]
