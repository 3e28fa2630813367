"""One engine per (checkpoint, base, device, dtype, backends, options) in a process: Flow-GRPO's two multi_score
calls (train and eval reward fns) hold one engine and one VAE; the registry holds engines weakly; and the RL
factory refuses arguments it cannot honour when it is registered, not when training starts."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from flow_grpo import build_score_fns, multi_score

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.pixel import PixelFrontEnd
from engine.rl import dit_reward_factory, dit_reward_fn
from engine.shared import shared_engine, shared_engines


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    pixel = RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")
    return pixel.save_pretrained(tmp_path_factory.mktemp("rl-shared") / "reward")


def _factory(checkpoint, **kw):
    kw = {"dtype": torch.float32, "kernels_backend": "torch", **kw}
    return dit_reward_factory(checkpoint, base=default_tiny_base(), normalize=True, **kw)


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list:
    """Replace the classmethod `cls.name` by one that records each call (thread-safe) and then runs it."""
    calls, lock, real = [], threading.Lock(), getattr(cls, name).__func__

    def counting(klass, *args, **kwargs):
        with lock:
            calls.append(args)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, name, classmethod(counting))
    return calls


def test_two_multi_score_calls_hold_one_engine(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    gc.collect()  # no engine of this checkpoint left alive by another test
    engines = _count_calls(monkeypatch, RewardEngine, "from_pretrained")
    fronts = _count_calls(monkeypatch, PixelFrontEnd, "from_pretrained")
    score_functions = {"dit_reward": _factory(checkpoint)}  # the registry entry the README adds
    score_dict = {"dit_reward": 1.0}
    device = torch.device("cpu")
    # train_sd3.py: reward_fn = multi_score(device, ...); eval_reward_fn = multi_score(device, ...)
    reward_fn = multi_score(score_functions, device, score_dict)
    eval_reward_fn = multi_score(score_functions, device, score_dict)
    assert len(engines) == 1 and len(fronts) == 1  # one MMDiT; one VAE and one set of text encoders
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = ("a cat", "a cat", "a dog", "a dog")
    train, _ = reward_fn(images, prompts, {}, only_strict=True)
    evaluation, _ = eval_reward_fn(images, prompts, {}, only_strict=False)
    np.testing.assert_array_equal(train["avg"], evaluation["avg"])
    # the reward fns multi_score builds hold the very same objects
    train_fns = build_score_fns(score_functions, score_dict, device)
    eval_fns = build_score_fns(score_functions, score_dict, device)
    engine = train_fns["dit_reward"].engine
    assert eval_fns["dit_reward"].engine is engine and eval_fns["dit_reward"].engine.pixel is engine.pixel
    assert sum(e is engine for e in shared_engines()) == 1 and len(engines) == 1
    # a path spelt differently (relative, trailing dot) is the same checkpoint
    same = dit_reward_fn(checkpoint / ".", base=default_tiny_base(), dtype="fp32", kernels_backend="torch")
    assert same.engine is engine


def test_engines_differ_where_their_definition_does(checkpoint, tmp_path) -> None:
    engine = _factory(checkpoint)("cpu").engine
    # options at their defaults, or resolving to the same backends, define the same engine
    assert _factory(checkpoint, adaln_on_host=False, attention="auto", dtype="fp32")("cpu").engine is engine
    assert _factory(checkpoint, dtype=torch.bfloat16)("cpu").engine is not engine
    assert _factory(checkpoint, check_finite=False)("cpu").engine is not engine
    assert _factory(checkpoint, max_sequence_length=16)("cpu").engine is not engine
    copy = engine.save_pretrained(tmp_path / "copy")
    copied = _factory(copy)("cpu").engine
    assert copied is not engine
    engine.save_pretrained(copy)  # rewritten in place (atomically): new content, new engine
    assert _factory(copy)("cpu").engine is not copied


def test_registry_holds_engines_weakly(checkpoint) -> None:
    fn = _factory(checkpoint, check_finite=False, strict_prompt_length=True)("cpu")
    alive = weakref.ref(fn.engine)
    del fn
    gc.collect()
    assert alive() is None, "the registry kept an engine nobody holds"


def test_concurrent_callers_wait_for_one_build(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _count_calls(monkeypatch, RewardEngine, "from_pretrained")
    start = threading.Barrier(4)

    def load(_):
        start.wait()
        return shared_engine(checkpoint, base=default_tiny_base(), dtype="fp32", device="cpu",
                             kernels_backend="torch", max_sequence_length=200)  # fmt: skip

    with ThreadPoolExecutor(max_workers=4) as pool:
        engines = list(pool.map(load, range(4)))
    assert len(built) == 1 and all(e is engines[0] for e in engines)


def test_factory_refuses_what_it_cannot_honour_at_registration(checkpoint) -> None:
    base = default_tiny_base()
    with pytest.raises(ValueError, match="device is not an option here: Flow-GRPO's multi_score calls the factory"):
        dit_reward_factory(checkpoint, base=base, device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword 'kernel_backend'; engine options are kernels_backend"):
        dit_reward_factory(checkpoint, base=base, kernel_backend="torch")
    with pytest.raises(ValueError, match="dtype must be one of"):
        dit_reward_factory(checkpoint, base=base, dtype="float8")
    with pytest.raises(ValueError, match="'meta' holds shapes but no values"):
        _factory(checkpoint)("meta")
    with pytest.raises(ValueError, match="'meta' holds shapes but no values"):
        RewardEngine.from_preset("tiny", device="meta")
