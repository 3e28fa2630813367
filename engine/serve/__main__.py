"""``python -m engine.serve``: start the reward server (Ray Serve) and keep it up until interrupted.

python -m engine.serve --preset tiny --dtype fp32                  # random weights: try it on any machine
python -m engine.serve --checkpoint CKPT --base SD35 --dtype bf16 --device cuda --autoscale 1:4 --port 8000
RAY_ADDRESS=ray://head:10001 python -m engine.serve --checkpoint CKPT --base SD35 --device cuda --replicas 16
"""

from __future__ import annotations

import signal
import sys
import threading

from engine.schema import parse_cli
from engine.serve.config import ServeFlags


def parse_args(argv: list[str] | None = None) -> ServeFlags:
    return parse_cli(ServeFlags, argv, prog="python -m engine.serve", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> None:
    flags = parse_args(argv)
    from ray import serve

    from engine.serve.app import start

    url = start(flags)
    what = f"preset {flags.preset} (random weights)" if flags.preset else f"checkpoint {flags.checkpoint}"
    low, high = flags.replica_range
    replicas = f"{low}" if low == high else f"{low}-{high} (autoscaled)"
    print(f"DiT-Reward server '{flags.name}': {what} on {flags.resolved_device()}, {replicas} replica(s) at "
          f"{url}/score", file=sys.stderr)  # fmt: skip
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
