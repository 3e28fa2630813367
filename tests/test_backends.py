"""The execution policy is a value each engine carries: engines with different kernel backends run side by side
without touching each other or leaving state behind, and gradient checkpointing recomputes under the backends of the
forward it recomputes."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")

from conftest import random_inputs  # noqa: E402

from engine import RewardEngine  # noqa: E402
from kernels.backend import observe_launches  # noqa: E402
from training.model import TrainableReward  # noqa: E402


def _launch_counter() -> tuple[Counter, callable]:
    """Triton launches per thread, and the callback that counts them."""
    per_thread: Counter = Counter()
    return per_thread, lambda kernel, args, kwargs: per_thread.update([threading.get_ident()])


def test_two_engines_with_different_kernel_backends_score_concurrently() -> None:
    engines = {
        name: RewardEngine.from_preset("tiny", dtype="fp32", kernels_backend=name) for name in ("triton", "torch")
    }
    z0, pe, po, noise = (x.bfloat16() for x in random_inputs(batch=2, h=8, w=8, text_len=5, seed=3))
    expected = {name: engine.score(z0, (pe, po), noise=noise) for name, engine in engines.items()}
    assert not torch.equal(expected["triton"], expected["torch"])  # the backends differ in the last bits

    rounds, results, errors, threads_of = 3, {}, [], {}
    start = threading.Barrier(len(engines))

    def run(name: str) -> None:
        try:
            threads_of[name] = threading.get_ident()
            start.wait()
            results[name] = [engines[name].score(z0, (pe, po), noise=noise) for _ in range(rounds)]
        except Exception as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    per_thread, count = _launch_counter()
    with observe_launches(count):
        threads = [threading.Thread(target=run, args=(name,)) for name in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    for name, rewards in results.items():
        for reward in rewards:
            torch.testing.assert_close(reward, expected[name], rtol=0, atol=0, msg=name)
    assert per_thread[threads_of["torch"]] == 0, "the torch engine launched Triton kernels"
    assert per_thread[threads_of["triton"]] > 0

    # nothing left behind: each engine alone, afterwards, runs as before
    per_thread, count = _launch_counter()
    with observe_launches(count):
        after = engines["torch"].score(z0, (pe, po), noise=noise)
    assert not per_thread
    torch.testing.assert_close(after, expected["torch"], rtol=0, atol=0)
    torch.testing.assert_close(engines["triton"].score(z0, (pe, po), noise=noise), expected["triton"], rtol=0, atol=0)


def _kernel_name(kernel) -> str:
    return kernel.fn.__name__


@pytest.mark.parametrize("caller", ["trainer", "engine"])
def test_checkpoint_recompute_runs_the_engines_backends(caller: str) -> None:
    """With gradient checkpointing, backward recomputes each block: under the Triton backend that recompute launches
    the forward kernels again (LayerNorm-modulate, qk-norm split) - never the process default's torch references."""
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="triton")
    engine.requires_grad_(True)
    z0, pe, po, noise = random_inputs(batch=2, h=4, w=4, text_len=3, seed=5)
    if caller == "trainer":
        model = TrainableReward(engine, grad_checkpointing=True)
        loss = model(z0, pe, po, noise=noise).sum()
    else:
        engine.backbone.gradient_checkpointing = True
        loss = engine.score(z0, (pe, po), noise=noise, grad=True).sum()

    in_backward: Counter = Counter()
    with observe_launches(lambda kernel, args, kwargs: in_backward.update([_kernel_name(kernel)])):
        loss.backward()
    forward_kernels = {name for name in in_backward if "bwd" not in name and "backward" not in name}
    assert "_adaln_fwd_kernel" in forward_kernels, f"backward recomputed no Triton forward kernel: {in_backward}"
