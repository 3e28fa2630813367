"""`bench.latency --reward dina`: the DiNa-LRM-shaped engine and its diffusers + peft baseline time the same model
(equal rewards in fp32 on one seeded source), and their rows carry labels that bench.report and bench.targets read."""

from __future__ import annotations

import pytest
import torch

from bench import latency, report, targets

pytest.importorskip("peft")


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """|r - r_ref| <= 1e-4 max(|r_ref|, 1) per reward (fp32; some rewards are near zero)."""
    return bool(((ours - ref).abs() <= 1e-4 * ref.abs().clamp(min=1.0)).all())


@pytest.fixture(scope="module")
def tiny():
    from bench.dina import DinaSource, PeftBaseline, dina_engine

    source = DinaSource("tiny", torch.float32, "cpu", seed=0)
    engine = dina_engine(source, "cpu", "fp32")
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 16, 12, 8, generator=g), torch.randn(3, 9, 96, generator=g)]
    inputs += [torch.randn(3, 80, generator=g), torch.randn(3, 16, 12, 8, generator=g)]  # pooled, eps
    return source, engine, PeftBaseline(source, torch.float32), inputs


def test_the_baseline_is_diffusers_blocks_with_an_unmerged_peft_lora(tiny):
    from diffusers.models.attention import JointTransformerBlock
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    source, engine, baseline, _ = tiny
    assert isinstance(baseline.model, PeftModel)
    blocks = baseline.model.get_base_model().transformer_blocks
    assert len(blocks) == 3 and all(isinstance(b, JointTransformerBlock) for b in blocks)  # blocks 0-2 of 4
    lora = {n for n, m in baseline.model.named_modules() if isinstance(m, LoraLayer)}
    # 8 joint-attention targets per kept block, + the dual attention's 4 in block 0 (tiny: attn2 in block 0 only)
    assert len(lora) == 3 * 8 + 4 and any(".attn2.to_out.0" in n for n in lora)
    assert all(m.merged is False for n, m in baseline.model.named_modules() if isinstance(m, LoraLayer))
    assert engine.reward_config.layers == engine.reward_config.text_layers == (0, 1, 2)
    assert engine.reward_config.head == "query_attention" and engine.reward_config.schedule.kind == "flow_match_table"
    assert baseline.head.dtype == torch.float32 and engine.head is not baseline.head


@pytest.mark.parametrize("u", [None, 0.1, 0.9])
def test_engine_and_baseline_give_the_same_rewards(tiny, u):
    _, engine, baseline, (z0, emb, pooled, eps) = tiny
    ours = engine.score(z0, (emb, pooled), noise=eps, t=u)
    ref = baseline.score(z0, emb, pooled, noise=eps, u=u)
    assert ref.shape == (3,) and _close(ours, ref), (ours, ref)


def test_the_lora_and_the_noise_level_change_the_rewards(tiny):
    """What the parity above rests on: without the LoRA, or at another u, the rewards move far past the tolerance."""
    source, _, baseline, (z0, emb, pooled, eps) = tiny
    with_lora = baseline.score(z0, emb, pooled, noise=eps)
    with source.peft.disable_adapter():
        without = baseline.score(z0, emb, pooled, noise=eps)
    assert not _close(without, with_lora)
    assert not _close(baseline.score(z0, emb, pooled, noise=eps, u=0.1), with_lora)
    sigma, timestep = baseline.noise_level(0.1)  # DiNa's table: u = 0.1 -> sigma 0.10075, timestep 100.746
    assert float(sigma) == pytest.approx(0.100746259, abs=1e-7) and float(timestep) == pytest.approx(100.746262)


def test_one_seed_one_model():
    from bench.dina import DinaSource, PeftBaseline

    a, b = (DinaSource("tiny", torch.float32, "cpu", seed=0) for _ in range(2))
    for x, y in ((a.peft, b.peft), (a.head, b.head)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    other = DinaSource("tiny", torch.float32, "cpu", seed=1)
    g = torch.Generator().manual_seed(2)
    z0, emb, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 96, generator=g), torch.randn(2, 80)
    eps = torch.randn(2, 16, 8, 8, generator=g)
    ra = PeftBaseline(a, torch.float32).score(z0, emb, pooled, noise=eps)
    assert not torch.equal(ra, PeftBaseline(other, torch.float32).score(z0, emb, pooled, noise=eps))


def test_dina_rows_are_labelled_for_the_report_and_the_targets():
    argv = ["--reward", "dina", "--baselines", "--batch", "1", "8", "--iters", "1", "--resolution", "64"]
    rows = latency.main(argv)
    timed = {(r["path"], r["batch"]) for r in rows if r.get("per_image_ms", 0) > 0}
    paths = ("engine eager", "condition() per prompt", "engine eager, cond cached", targets.DINA_PEFT)
    assert timed == {(p, b) for p in paths for b in (1, 8)}
    assert all(r["head"] == "query_attention" and r["preset"] == "tiny" and r["resolution"] == 64 for r in rows)
    eager = next(r for r in rows if r["path"] == "engine eager")
    assert eager["layers"] == [0, 1, 2] and eager["flops_per_image"] > 0 and eager["dtype"] == "fp32"
    assert report.row_label(eager) == "engine eager [query_attention]"
    base = next(r for r in rows if r["path"] == targets.DINA_PEFT)
    assert report.row_role(base) == "baseline" and report.row_role(eager) == "engine"
    assert report.row_label(base) == "diffusers+peft eager [query_attention]"
    # the same rows as a GPU run would make them (SD3.5-M, 512²): the DiNa lines read them, the SD3.5-L ones do not
    gpu = [dict(r, preset="sd35-medium", resolution=512) for r in rows if "per_image_ms" in r]
    lines = {line["target"]: line for line in targets.evaluate({"sections": {"dina_512": {"rows": gpu}}})}
    for batch in (8, 1):
        line = lines[f"DiNa-shaped 512² b{batch} speedup vs diffusers+peft"]
        ms = {r["path"]: r["per_image_ms"] for r in gpu if r["batch"] == batch}
        uncached = ms[targets.DINA_PEFT] / ms["engine eager"]
        assert line["kind"] == "info" and line["uncached"]["value"] == pytest.approx(uncached, abs=1e-3)
        cached = ms[targets.DINA_PEFT] / ms["engine eager, cond cached"]
        assert line["cached"]["value"] == pytest.approx(cached, abs=1e-3)
    assert all("uncached" not in line for name, line in lines.items() if not name.startswith("DiNa"))
    table = report.render_markdown([report.Run("run", "gpu", {}, None, tuple(gpu))])
    assert "| latent | 512² | diffusers+peft eager [query_attention] | baseline | sd35-medium | fp32 | 8 |" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reward", "dina", "--baselines", "eager"], "--baselines: got ['eager'], expected baselines of --reward"),
        (["--baselines", "peft"], "--baselines: got ['peft'], expected baselines of --reward dit-reward"),
        (["--reward", "dina", "--interface", "pixel"], "--interface: got 'pixel', expected latent with --reward"),
        (["--reward", "dina", "--preset", "sd35-large"], "--preset: got 'sd35-large', expected one of"),
        (["--reward", "dina", "--checkpoint", "x"], "--checkpoint: got 'x', expected none with --reward dina"),
        (["--reward", "dit"], "--reward: got 'dit'"),
    ],
)
def test_bad_dina_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        latency.parse_args(argv)
    assert message in capsys.readouterr().err


def test_dina_defaults():
    args = latency.parse_args(["--reward", "dina", "--baselines"])
    assert args.baselines == ["peft"] and args.text_len == 77 + 128  # their training length
    assert latency.parse_args(["--baselines"]).baselines == list(latency.BASELINES)


@pytest.mark.parametrize("failing", ["engine", targets.DINA_PEFT])
def test_a_failing_side_costs_only_its_own_rows(failing):
    argv = ["--reward", "dina", "--baselines", "--batch", "2", "--iters", "1", "--resolution", "64"]
    rows = latency.main([*argv, "--fail-path", failing])
    (failed,) = [r for r in rows if r["path"] == failing]
    assert failed["error"] == f"error: RuntimeError: injected failure of '{failing}' (--fail-path)"
    timed = {r["path"] for r in rows if r.get("per_image_ms", 0) > 0}
    other = {targets.DINA_PEFT} if failing == "engine" else {"engine eager", "engine eager, cond cached"}
    assert timed >= other and failing not in timed


def test_costs_count_the_text_stream_a_query_attention_head_reads():
    """The DiNa rows' FLOPs: the deepest block also runs its text stream (text queries' q projection and attention
    rows, output projection, FFN), counted here by hand; a mean-pool readout counts as before."""
    from bench.costs import engine_costs
    from engine.model.mmdit import Readout

    def flops(**kw) -> float:
        return engine_costs("tiny", 128, 9, **kw)["flops_per_image"]

    assert flops(readout=Readout(pooled=(1, 3))) == flops(layers=(1, 3))
    text, width, tokens = 9, 32, 9 + (128 // 16) ** 2  # L, D, N = L + N_img
    by_hand = 2 * text * width**2 * 2 + 2 * 2 * text * tokens * width + 2 * text * width * 4 * width * 2
    dina = Readout(image=(0, 1, 2), text=(0, 1, 2), temb=True)
    assert flops(readout=dina) - flops(layers=(0, 1, 2)) == by_hand


def test_in_bf16_the_engine_is_as_close_to_fp32_as_the_baseline():
    """STYLE.md's rule on the timed dtype: err(engine bf16 vs fp32) <= 2 err(diffusers + peft bf16 vs fp32) + eps."""
    from bench.dina import DinaSource, PeftBaseline, dina_engine

    source = DinaSource("tiny", torch.float32, "cpu", seed=0)
    g = torch.Generator().manual_seed(3)
    z0, emb, pooled, eps = (
        torch.randn(shape, generator=g) for shape in ((8, 16, 12, 8), (8, 9, 96), (8, 80), (8, 16, 12, 8))
    )
    truth = PeftBaseline(source, torch.float32).score(z0, emb, pooled, noise=eps)
    low = [t.bfloat16() for t in (z0, emb, pooled, eps)]
    ours = dina_engine(source, "cpu", "bf16").score(low[0], (low[1], low[2]), noise=low[3])
    source.peft.to(torch.bfloat16)  # their model dtype (the head is cast by the baseline)
    theirs = PeftBaseline(source, torch.bfloat16).score(*low[:3], noise=low[3])

    def err(x: torch.Tensor) -> float:
        return float((x - truth).norm() / truth.norm())

    assert err(theirs) > 0 and err(ours) <= 2 * err(theirs) + 1e-3, (err(ours), err(theirs))
