"""The reward server as a Ray Serve application: an HTTP ingress in front of `Scorer` replicas that batch requests.

    client --POST /score--> Ingress (engine.serve.ingress: auth, size and upload limits, the envelope)
                              --deployment handle--> Scorer (engine.serve.scorer: checks, @serve.batch, one engine)

Three ways to run it, one set of settings (`engine.serve.config.ServeConfig`):

    python -m engine.serve --checkpoint CKPT --base SD35 --device cuda --autoscale 1:4
    serve run engine.serve.app:app_builder checkpoint=CKPT base=SD35 device=cuda autoscale=1:4
    serve build engine.serve.app:app -o serve.yaml   # then import_path: engine.serve.app:app_builder, args: {...}

Backpressure is Ray Serve's: each Scorer replica takes at most ``max_ongoing`` requests; beyond that requests wait
in the handle's queue, and past ``max_queued`` the handle raises `BackPressureError`, answered 503 with
``Retry-After``. The handle counts every request as queued until a replica takes it, so a simultaneous burst can be
refused before ``max_queued`` are really waiting; the clients in `client.py` retry those 503s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve

from engine.api import RewardEngine
from engine.serve.config import ServeConfig, ServeFlags, config_from_args
from engine.serve.ingress import Ingress, ingress_slots
from engine.serve.scorer import Scorer, build_engine

APP_NAME = "dit-reward"


def build_app(
    config: ServeConfig, engine_builder: Callable[[ServeConfig], RewardEngine] = build_engine
) -> serve.Application:
    """The Ray Serve application: ``serve.run(build_app(config), route_prefix="/")``. `engine_builder` makes each
    replica's engine from the config (default: the preset, or the checkpoint + base). On a CUDA device each Scorer
    replica takes one GPU. With ``autoscale`` Ray Serve keeps MIN..MAX Scorers, adding one when each holds more
    than a full batch of requests (``target_ongoing_requests = max_batch``: a replica is not busier than that
    until its batches are full)."""
    on_gpu = config.resolved_device().startswith("cuda")
    low, high = config.replica_range
    replicas: dict[str, Any] = {"num_replicas": low}
    if config.autoscale is not None:
        replicas = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                           "target_ongoing_requests": config.max_batch}}  # fmt: skip
    scorer = Scorer.options(
        **replicas,
        max_ongoing_requests=config.ongoing_per_replica,
        max_queued_requests=config.max_queued,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1},
    ).bind(config, engine_builder)
    return Ingress.options(
        num_replicas=max(low, 1),
        max_ongoing_requests=ingress_slots(config),
        # never reached while the slots above hold (uploads and Scorer admission answer 503 first); if it is,
        # the proxy answers 503 instead of queueing without bound
        max_queued_requests=ingress_slots(config),
        ray_actor_options={"num_cpus": 0},
    ).bind(scorer, config)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder: ``serve run engine.serve.app:app_builder checkpoint=CKPT base=SD35`` (values
    as text) or a Serve config file's ``import_path: engine.serve.app:app_builder`` with ``args:`` (typed values).
    The arguments are the fields of `ServeConfig` (the flags of ``python -m engine.serve`` with ``_`` for ``-``);
    the application's name and route prefix are Ray's (``serve run --name``, the config file's ``name:``)."""
    return build_app(config_from_args(args))


# For `serve build engine.serve.app:app -o serve.yaml`, which takes an Application and no arguments: the tiny preset
# with random weights on the CPU. To serve a real model, point the file's import_path at app_builder, give args
# (checkpoint, base, device, autoscale, ...) and delete its `deployments:` list, whose entries would override what
# the args set (tests/test_serve_deploy.py does exactly this).
app = app_builder({"preset": "tiny", "dtype": "fp32", "device": "cpu"})


def init_ray(num_cpus: int | None = None, object_store_mb: int = 256) -> None:
    """Join the cluster at $RAY_ADDRESS, or start a small local Ray (no dashboard, quiet workers, metrics exported
    every second so ``/metrics`` is current). The workers import this package from the driver's PYTHONPATH."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        _system_config={"metrics_report_interval_ms": 1000},
    )


def start(
    config: ServeConfig | ServeFlags,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    name: str = APP_NAME,
    engine_builder: Callable[[ServeConfig], RewardEngine] = build_engine,
) -> str:
    """Start (or join) Ray, deploy the server, wait until it is ready; returns its base URL. `ServeFlags` carry
    their own host, port, CPUs and name."""
    if isinstance(config, ServeFlags):
        host, port, num_cpus, name = config.host, config.port, config.num_cpus, config.name
        config = ServeConfig(**{k: getattr(config, k) for k in ServeConfig.model_fields})
    init_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, engine_builder), name=name, route_prefix="/")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def scorer_handle(name: str = APP_NAME) -> Any:
    """The Scorer deployment handle of the running application `name` (``python -m engine.serve --name``,
    ``serve run --name``, or a config file's ``name:``). In-cluster callers skip HTTP with
    ``await handle.score.remote(tensors)``, tensors named as in `engine.serve.wire`."""
    return serve.get_deployment_handle("Scorer", app_name=name)
