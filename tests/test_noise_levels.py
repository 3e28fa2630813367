"""Scoring at any noise level: t per call and per latent, add_noise=False on x_t, the ensemble, the per-(prompt, t)
conditioning cache, and the time schedules."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_inputs, rel_err

from engine import RewardEngine
from engine.schedule import TimeSchedule


@pytest.fixture(scope="module")
def engine():
    return RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")


@pytest.fixture(scope="module")
def inputs():
    z0, pe, po, noise = random_inputs(batch=4, h=8, w=10, text_len=7, seed=31)
    return z0, (pe, po), noise


def test_default_t_is_the_checkpoints(engine, inputs):
    z0, emb, noise = inputs
    assert torch.equal(engine.score(z0, emb, noise=noise), engine.score(z0, emb, noise=noise, t=0.1))
    assert not torch.equal(engine.score(z0, emb, noise=noise), engine.score(z0, emb, noise=noise, t=0.4))


def test_per_latent_t_equals_separate_calls(engine, inputs):
    """Row b of a call with t [B] is the row b of a call with t = t[b] for all, for fixed and for seeded noise. Same
    shapes, same ops, but the noise op forms 1 - t from a float32 t rather than from a Python float: up to an ulp of
    z_t, so equal to 1e-6 (different levels give different rewards: checked below)."""
    z0, emb, noise = inputs
    t = torch.tensor([0.1, 0.7, 0.35, 0.7])
    for kw in ({"noise": noise}, {"seed": 5}):
        rewards = engine.score(z0, emb, t=t, **kw)
        for b, level in enumerate(t.tolist()):
            assert rel_err(rewards[b], engine.score(z0, emb, t=level, **kw)[b]) < 1e-6
    # one latent, one eps, four rows: three levels give three rewards (the comparison can fail)
    same = engine.score(
        z0[:1].expand(4, -1, -1, -1), (emb[0][:1], emb[1][:1]), noise=noise[:1].expand(4, -1, -1, -1), t=t
    )
    assert len(set(same.tolist())) == 3


def test_add_noise_false_scores_x_t(engine, inputs):
    """x_t made by hand at t, scored with add_noise=False, equals add_noise=True with the same noise."""
    z0, emb, noise = inputs
    for t in (0.25, torch.tensor([0.2, 0.5, 0.8, 0.5])):
        level = t if isinstance(t, float) else t.view(-1, 1, 1, 1)
        x_t = (1 - level) * z0 + level * noise
        on_x_t = engine.score(x_t, emb, t=t, add_noise=False)
        assert rel_err(on_x_t, engine.score(z0, emb, noise=noise, t=t)) < 1e-6
    with pytest.raises(ValueError, match="pass neither noise nor seed"):
        engine.score(z0, emb, noise=noise, add_noise=False)
    # a sampler's first state is pure noise (sigma 1): scored as it is, never noised to it
    assert torch.isfinite(engine.score(noise, emb, t=1.0, add_noise=False)).all()


def test_ensemble_of_a_mean_pool_head_averages_its_views(engine, inputs):
    z0, emb, noise = inputs
    levels = [0.2, 0.5, 0.9]
    ensemble = engine.score(z0, emb, noise=noise, t=levels)
    views = torch.stack([engine.score(z0, emb, noise=noise, t=level) for level in levels])
    assert rel_err(ensemble, views.mean(0)) < 1e-6
    assert rel_err(ensemble, views[0]) > 1e-3  # (the comparison can fail)
    # fresh seeded noise: the K views of a latent share its eps
    seeded = engine.score(z0, emb, seed=9, t=levels)
    assert rel_err(seeded, torch.stack([engine.score(z0, emb, seed=9, t=v) for v in levels]).mean(0)) < 1e-6
    with pytest.raises(ValueError, match="does not combine"):
        engine.score(z0, emb, t=levels, add_noise=False)


def test_bad_t_is_refused(engine, inputs):
    z0, emb, noise = inputs
    cases = [
        (1.0, "must lie in \\(0, 1\\)"),
        (float("nan"), "finite float"),
        (torch.tensor([0.1, 0.2]), "a float tensor \\[4\\]"),
        (torch.tensor([1, 2, 3, 4]), "a float tensor"),
        ([0.1, 1.5], "t\\[1\\] must lie in"),
        ([], "at least one float"),
        ("0.1", "finite float"),
    ]
    for t, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.score(z0, emb, noise=noise, t=t)


def test_conditioning_is_cached_per_prompt_and_t(engine, inputs):
    z0, (pe, po), noise = inputs
    cond = engine.condition(pe[:2], po[:2], t=[0.3, 0.6])  # made ahead: two misses
    assert (cond.hits, cond.misses) == (0, 2)
    index = torch.tensor([0, 1, 1, 0])
    for _ in range(3):  # a sampler visiting the same levels
        for t in (0.3, 0.6, 0.1, 0.8):
            cached = engine.score(z0, cond, noise=noise, prompt_index=index, t=t)
    assert (cond.misses, cond.hits) == (3, 11)  # 0.8 made once; 0.1 is the conditioning's own level
    direct = engine.score(z0, (pe[index], po[index]), noise=noise, t=0.8)
    assert rel_err(cached, direct) < 1e-6
    # a hand-built Conditioning holds its own level only
    by_hand = type(cond)(context=cond.context, modulation=cond.modulation, t=cond.t)
    engine.score(z0[:2], by_hand, noise=noise[:2])
    with pytest.raises(ValueError, match="cannot serve t=0.3"):
        engine.score(z0[:2], by_hand, noise=noise[:2], t=0.3)


def test_one_conditioning_scored_from_two_threads(engine, inputs):
    """Two threads scoring against one Conditioning at interleaved levels get what serial calls give."""
    z0, (pe, po), noise = inputs
    levels = [0.05 * k for k in range(1, 19)]
    serial = {t: engine.score(z0, engine.condition(pe, po), noise=noise, t=t) for t in levels}
    cond, results, errors = engine.condition(pe, po), {}, []

    def run(order):
        try:
            for t in order:
                results[(threading.get_ident(), t)] = (t, engine.score(z0, cond, noise=noise, t=t))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(order,)) for order in (levels, levels[::-1])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 2 * len(levels)
    for t, rewards in results.values():
        assert torch.equal(rewards, serial[t])
    assert cond.hits + cond.misses == 2 * len(levels)


def test_flow_match_table_is_diffusers_table():
    """DiNa-LRM's u -> the nearest sigma of the shift-3 FlowMatch table, and its timestep, against diffusers'
    scheduler (an independent implementation of the table)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = TimeSchedule(kind="flow_match_table", shift=3.0, num_train_timesteps=1000)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for u in (0.0, 0.05, 0.1, 0.3, 0.4, 0.5, 0.77, 0.9, 0.997):
        index = int(torch.argmin((scheduler.sigmas - u).abs()))
        sigma = schedule.sigma(u)
        assert sigma == float(scheduler.sigmas[index])
        assert schedule.timestep(sigma) == float(scheduler.timesteps[index])
    assert schedule.sigma(0.1) == pytest.approx(0.100746259, abs=1e-9)
    with pytest.raises(ValueError, match="snaps to sigma 1"):
        schedule.check(0.99995)
    direct = TimeSchedule()
    assert (direct.sigma(0.1), direct.timestep(0.1)) == (0.1, 1000.0 * 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_scorer_takes_t_as_data():
    """GraphedScorer at the checkpoint's t, at another t, per latent, and on x_t equals engine.score with the same
    noise (the same kernels: up to fp32 summation order of the captured GEMMs)."""
    from engine.runtime.graphs import GraphedScorer

    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, device="cuda")
    z0, pe, po, noise = (x.cuda() for x in random_inputs(batch=3, h=8, w=10, text_len=7, seed=32))
    cond = engine.condition(pe, po)
    graphed = GraphedScorer(engine, buckets=(4,))
    for t in (None, 0.6, torch.tensor([0.2, 0.6, 0.9], device="cuda")):
        expected = engine.score(z0, cond, noise=noise, t=t)
        assert rel_err(graphed.score(z0, cond, noise=noise, t=t), expected) < 1e-5
        level = 0.1 if t is None else t if isinstance(t, float) else t.view(-1, 1, 1, 1)
        x_t = (1 - level) * z0 + level * noise
        assert rel_err(graphed.score(x_t, cond, t=t, add_noise=False), expected) < 1e-5
    assert {key[-1] for key in graphed.graphs} == {True, False}  # the noising graph and the x_t graph


def test_latent_reward_fn_scores_a_samplers_state(engine, inputs):
    from engine.rl import dit_latent_reward_fn

    z0, (pe, po), noise = inputs
    fn = dit_latent_reward_fn(engine)
    x_t = 0.6 * z0 + 0.4 * noise
    assert torch.equal(fn(x_t, pe, po, t=0.4, add_noise=False), engine.score(x_t, (pe, po), t=0.4, add_noise=False))
    common = engine.common_noise(z0)
    assert torch.equal(fn(z0, pe, po, t=0.7), engine.score(z0, (pe, po), common, t=0.7))


def test_per_latent_t_is_differentiable(engine, inputs):
    """Reward gradients w.r.t. the latents with t [B] equal, row by row, those of separate float-t calls."""
    z0, emb, noise = inputs
    t = torch.tensor([0.2, 0.5, 0.8, 0.5])
    z = z0.clone().requires_grad_(True)
    engine.score(z, emb, noise=noise, t=t, grad=True).sum().backward()
    for b, level in enumerate(t.tolist()):
        zb = z0.clone().requires_grad_(True)
        engine.score(zb, emb, noise=noise, t=level, grad=True)[b].backward()
        assert rel_err(z.grad[b], zb.grad[b]) < 1e-5
