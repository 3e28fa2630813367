"""Deploying the reward server with Ray Serve's own CLI, as a Ray user would: ``serve build`` writes a
config file, whose ``import_path`` goes to the app builder with ``args:`` (autoscaling included), ``serve run``
deploys it and ``serve run engine.serve.app:app_builder key=value`` deploys from the command line; both score like
the in-process engine and `scorer_handle(name=...)` finds each by its application name."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402
from serve_helpers import TOKEN, TOL, free_port, in_process, make_request  # noqa: E402

from engine import RewardEngine  # noqa: E402
from engine.serve import ScoreClient  # noqa: E402
from engine.serve.app import init_ray, scorer_handle  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])
SERVE_CLI = str(Path(sys.executable).with_name("serve"))


def serve_cli(*args: str, cwd: Path) -> None:
    done = subprocess.run([SERVE_CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"serve {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def wait_ready(client: ScoreClient, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get("/healthz")
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.mark.slow
def test_serve_build_yaml_and_serve_run_deploy_and_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # the CLI and the cluster's workers import this checkout (the installed package may be another one)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    serve_cli("build", "engine.serve.app:app", "-o", "serve.yaml", cwd=tmp_path)
    config = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "engine.serve.app:app" and {d["name"] for d in app["deployments"]} == {
        "Scorer",
        "Ingress",
    }
    # What the README tells a user to edit: the builder, its args, the name; the deployments' options come from args.
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app.pop("deployments")
    args = {"preset": "tiny", "dtype": "fp32", "device": "cpu", "autoscale": "1:2", "max_batch": 4, "token": TOKEN}
    app.update(name="from-yaml", import_path="engine.serve.app:app_builder", args=args)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))

    init_ray(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    engine = RewardEngine.from_preset("tiny", dtype="fp32")
    try:
        serve_cli("run", "--address", address, "--non-blocking", "serve.yaml", cwd=tmp_path)
        serve_cli("run", "--address", address, "--non-blocking", "--name", "from-cli", "--route-prefix", "/cli",
                  "engine.serve.app:app_builder", "preset=tiny", "dtype=fp32", "device=cpu", "max_batch=2",
                  f"token={TOKEN}", cwd=tmp_path)  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        for name, prefix in (("from-yaml", ""), ("from-cli", "/cli")):
            client = ScoreClient(f"http://127.0.0.1:{port}{prefix}", TOKEN, retry_timeout_s=60)
            wait_ready(client)
            x = make_request(engine, gen, batch=3, side=8, prompts=1, kind="seed")
            torch.testing.assert_close(client.score(**x)["rewards"], in_process(engine, x), rtol=0, atol=TOL)
            wire = {**x, "seed": torch.tensor(x["seed"])}
            out = scorer_handle(name=name).score.remote(wire).result(timeout_s=60)
            torch.testing.assert_close(out["rewards"], in_process(engine, x), rtol=0, atol=TOL)
        details = serve.context._get_global_client().get_serve_details()["applications"]
        scorer = details["from-yaml"]["deployments"]["Scorer"]["deployment_config"]
        assert (scorer["autoscaling_config"]["min_replicas"], scorer["autoscaling_config"]["max_replicas"]) == (1, 2)
        assert scorer["max_ongoing_requests"] == 2 * 4  # from args: 2 x max_batch
        assert details["from-cli"]["deployments"]["Scorer"]["deployment_config"]["num_replicas"] == 1
    finally:
        serve.shutdown()
        ray.shutdown()
