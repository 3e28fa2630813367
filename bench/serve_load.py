"""Throughput and latency of the reward server against concurrency, next to in-process scoring.

    python -m bench.serve_load                                # CPU: tiny preset; GPU: SD3.5-L shape at 512²
    python -m bench.serve_load --concurrency 1 4 16 64 --batch 1 8 --json bench/results/serve.json --plot serve.png

Each of C client threads sends requests of B latents (one prompt each) back to back and waits for each answer.
"server": the requests go over HTTP to a local Ray Serve deployment (`engine.serve`, one replica) that batches
them. "in-process": the same threads call `engine.score` on one engine in this process, one request at a time
(a lock: one device, no batching across requests) — what a rollout worker does without a server. Latency is per
request as the client sees it (queueing included); throughput is images scored per second of wall time. Random
weights (latency does not depend on the values). On the CPU the server replica and this process both compute with
one thread, so the two paths get the same compute.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from bench.harness import environment_info, provenance
from engine import RewardEngine
from engine.config import PRESETS
from engine.schema import Schema, parse_cli


def _on_gpu() -> bool:
    return torch.cuda.is_available()


Count = Annotated[int, Field(ge=1, le=65536)]


class ServeLoadArgs(Schema):
    """The command line of `python -m bench.serve_load`; defaults: SD3.5-L shape at 512² on a GPU, tiny on the CPU."""

    preset: Literal[tuple(PRESETS)] = Field(default_factory=lambda: "sd35-large" if _on_gpu() else "tiny")
    dtype: Literal["fp32", "bf16", "fp8"] = Field(default_factory=lambda: "bf16" if _on_gpu() else "fp32")
    resolution: int = Field(
        default_factory=lambda: 512 if _on_gpu() else 128, ge=16, le=8192, multiple_of=16, description="image side (px)"
    )
    text_len: Count = Field(default_factory=lambda: 333 if _on_gpu() else 32, description="text tokens per prompt")
    concurrency: list[Count] = Field(
        default_factory=lambda: [1, 4, 16, 64] if _on_gpu() else [1, 2, 4, 8],
        min_length=1,
        description="client threads",
    )
    batch: list[Count] = Field(
        default_factory=lambda: [1, 8] if _on_gpu() else [1, 4], min_length=1, description="latents per request"
    )
    requests: Count = Field(default_factory=lambda: 32 if _on_gpu() else 24, description="requests per setting")
    max_batch: Count = Field(16, description="server: requests per @serve.batch")
    batch_wait_ms: float = Field(5.0, ge=0, le=60_000, description="server: how long a batch waits to fill")
    port: int = Field(8123, ge=1, le=65535, description="HTTP port of the local server")
    num_cpus: Count | None = Field(
        default_factory=lambda: None if _on_gpu() else 2, description="CPUs of the local Ray"
    )
    json_out: str | None = Field(None, min_length=1, description="write {env, summary, rows} here",
                                 json_schema_extra={"cli": {"flag": "--json"}})  # fmt: skip
    plot: str | None = Field(None, min_length=1, description="write a PNG: throughput and latency against concurrency")


def parse_args(argv: list[str] | None = None) -> ServeLoadArgs:
    return parse_cli(ServeLoadArgs, argv, "python -m bench.serve_load", __doc__.split("\n")[0])


def make_requests(engine: RewardEngine, n: int, batch: int, side: int, text_len: int) -> list[dict]:
    cfg, gen = engine.config, torch.Generator().manual_seed(0)
    latent = side // 8
    return [
        {
            "latents": torch.randn(batch, cfg.in_channels, latent, latent, generator=gen).to(engine.dtype),
            "prompt_embeds": torch.randn(1, text_len, cfg.joint_attention_dim, generator=gen).to(engine.dtype),
            "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen).to(engine.dtype),
            "seed": i,
        }
        for i in range(n)
    ]


def drive(send, requests: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """C threads take requests from a shared list and send them one after another: (wall s, latencies ms)."""
    latencies: list[float] = []
    lock, queue = threading.Lock(), list(reversed(requests))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                x = queue.pop()
            start = time.perf_counter()
            send(x)
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def in_process_sender(engine: RewardEngine):
    lock = threading.Lock()
    device = engine.device

    def send(x: dict) -> torch.Tensor:
        with lock:  # one engine, one device: requests are scored one at a time
            r = engine.score(
                x["latents"].to(device), (x["prompt_embeds"].to(device), x["pooled"].to(device)), seed=x["seed"]
            )
            return r.cpu()

    return send


def server_sender(url: str):
    from engine.serve import ScoreClient

    client = ScoreClient(url)
    return lambda x: client.score(**x)["rewards"]


def row(path: str, batch: int, concurrency: int, wall_s: float, latencies: list[float], env: dict, **fields) -> dict:
    lat = np.asarray(latencies)
    return {
        "path": path,
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(latencies),
        "images_per_s": round(batch * len(latencies) / wall_s, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        **fields,
        **provenance(env),
    }


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, batch), style in zip(
        sorted({(r["path"], r["batch"]) for r in rows}), ["o-", "s-", "o--", "s--", "^-", "^--"], strict=False
    ):
        sel = sorted((r for r in rows if (r["path"], r["batch"]) == (name, batch)), key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in sel]
        ax_t.plot(c, [r["images_per_s"] for r in sel], style, label=f"{name} b{batch}")
        ax_l.plot(c, [r["p50_ms"] for r in sel], style, label=f"{name} b{batch} p50")
        ax_l.plot(c, [r["p99_ms"] for r in sel], style, alpha=0.35, label=f"{name} b{batch} p99")
    for ax, label in ((ax_t, "images / s"), (ax_l, "latency per request (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_l.set_yscale("log")
    ax_t.legend(fontsize=7)
    ax_l.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        torch.set_num_threads(1)  # the server's CPU replica computes with one thread (Ray: num_cpus=1)
        print(
            f"No GPU: running the '{args.preset}' preset on the CPU with random weights; these numbers show the "
            "server's overhead and batching on a toy model, not GPU serving throughput.",
            file=sys.stderr,
        )
    from ray import serve

    from engine.serve.app import start
    from engine.serve.config import ServeConfig

    env = environment_info(device)
    engine = RewardEngine.from_preset(args.preset, dtype=args.dtype, device=device)
    config = ServeConfig(
        preset=args.preset,
        dtype=args.dtype,
        device=device,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queued=4 * max(args.concurrency),
    )
    url = start(config, port=args.port, num_cpus=args.num_cpus)
    senders = {"in-process": in_process_sender(engine), "server": server_sender(url)}
    fields = dict(
        preset=args.preset, dtype=args.dtype, resolution=args.resolution, text_len=args.text_len, random_weights=True
    )
    rows = []
    try:
        for batch in args.batch:
            requests = make_requests(engine, args.requests, batch, args.resolution, args.text_len)
            for name, send in senders.items():
                for x in requests[:2]:  # warm-up (first-call allocations, the server's conditioning cache)
                    send(x)
                for c in args.concurrency:
                    wall, lat = drive(send, requests, c)
                    rows.append(row(name, batch, c, wall, lat, env, **fields))
                    r = rows[-1]
                    print(f"{name:<10} b{batch:<2} c{c:<3} {r['images_per_s']:>8.1f} img/s  p50 {r['p50_ms']:8.2f} ms"
                          f"  p99 {r['p99_ms']:8.2f} ms", file=sys.stderr)  # fmt: skip
    finally:
        serve.shutdown()
    overhead = {
        r["batch"]: round(r["p50_ms"] - ref["p50_ms"], 3)
        for r in rows
        for ref in rows
        if r["path"] == "server" and ref["path"] == "in-process" and r["concurrency"] == ref["concurrency"] == 1
        and r["batch"] == ref["batch"]
    }  # fmt: skip
    summary = {"server_overhead_ms_c1": overhead}
    print(f"server overhead per request at concurrency 1 (p50 server - in-process), by batch: {overhead} ms")
    print_table(rows)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"env": env, "summary": summary, "rows": rows}, indent=1))
    if args.plot:
        where = env["gpu"] or f"{env['cpu'] or 'CPU'}, {env['cpu_count']} cores"
        plot(rows, f"{args.preset} (random weights), {args.dtype}, {args.resolution}², {where}", args.plot)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| path | batch | clients | images/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['path']} | {r['batch']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
