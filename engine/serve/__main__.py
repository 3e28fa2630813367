"""``python -m engine.serve``: start the reward server (Ray Serve) and keep it up until interrupted.

python -m engine.serve --preset tiny                               # random weights: try it on any machine
python -m engine.serve --checkpoint CKPT --base SD35 --dtype bf16 --device cuda --replicas 4 --port 8000
RAY_ADDRESS=ray://head:10001 python -m engine.serve --checkpoint CKPT --base SD35 --device cuda --replicas 16
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from engine.serve.app import EngineSpec, ServeConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="reward checkpoint directory (with --base unless it holds the backbone)")
    model.add_argument("--preset", help="random weights, seed 0 (RewardEngine.from_preset): tiny, sd35-large, ...")
    p.add_argument("--base", help="SD3/SD3.5 diffusers directory or single file (with --checkpoint)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp8 | fp16 | fp32 (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="Scorer replicas, one engine (and one GPU) each")
    p.add_argument("--max-batch", type=int, default=16, help="requests per batch (@serve.batch max_batch_size)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (ms)")
    p.add_argument("--max-ongoing", type=int, default=None, help="requests in flight per replica (default 2x batch)")
    p.add_argument("--max-queued", type=int, default=256, help="requests queued before answering 503")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="larger bodies are answered 413")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (else 401)")
    p.add_argument("--cache-size", type=int, default=256, help="conditioned prompt rows kept per replica (LRU)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    args = p.parse_args(argv)
    if args.base and not args.checkpoint:
        p.error("--base goes with --checkpoint")
    for name in ("replicas", "max_batch", "max_queued", "cache_size"):
        if getattr(args, name) < (0 if name == "cache_size" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from ray import serve

    from engine.serve.app import start

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = EngineSpec(preset=args.preset, checkpoint=args.checkpoint, base=args.base, dtype=args.dtype, device=device)
    config = ServeConfig(
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing or 2 * args.max_batch,
        max_queued_requests=args.max_queued,
        max_request_mb=args.max_request_mb,
        token=args.token,
        cache_size=args.cache_size,
    )
    url = start(spec, config, host=args.host, port=args.port, num_cpus=args.num_cpus)
    what = f"preset {args.preset} (random weights)" if args.preset else f"checkpoint {args.checkpoint}"
    print(f"DiT-Reward server: {what} on {device}, {args.replicas} replica(s) at {url}/score", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
