"""The FP8 fidelity section of `python -m bench.gpu_check`: how well FP8 variants of the engine reproduce the bf16
engine's rewards, and which of FP8's two rounding errors (weights, activations) costs the agreement."""

from __future__ import annotations

import torch

from bench.gpu_sections import Section, Setup, free_memory, log
from bench.workload import dtype_kwargs


def _keep_bf16(keep):
    """Variant transform: quantise a bf16 engine's block linears except those `keep(block, name)` selects."""

    def transform(engine) -> None:
        from engine.runtime.fp8 import quantize_fp8

        quantize_fp8(engine.backbone, keep_bf16=keep)

    return transform


def _emulate_e4m3(weights: bool, activations: bool):
    """Variant transform: a bf16 engine whose block linears (adaLN excluded, as in `dtype="fp8"`) see FP8's rounding —
    weights rounded to rowwise e4m3 once, and/or inputs rounded per token in a pre-hook — while the GEMMs stay bf16.
    Each source alone says which of FP8's two errors costs the fidelity (the fix differs: weight rounding can be
    calibrated at load, activation rounding cannot); both together check the emulation against the real FP8 engine.

    The FFN's first linear is hooked through its `GELUProjection`: on CUDA `Ops.linear_gelu` runs the GEMM with its
    GELU epilogue from `proj`'s weights without calling `proj`, so a hook on `proj` itself would never fire there."""
    import kernels
    from engine.model.layers import GELUProjection

    def rounded(x: torch.Tensor) -> torch.Tensor:
        q, scale = kernels.quantize_rowwise(x.reshape(-1, x.shape[-1]), backend="torch")
        return (q.float() * scale).to(x.dtype).reshape(x.shape)

    def round_input(_, args):
        return (rounded(args[0]), *args[1:])

    def transform(engine) -> None:
        blocks = engine.backbone.transformer_blocks
        for name, m in blocks.named_modules():
            if not isinstance(m, torch.nn.Linear) or ".norm1" in f".{name}":
                continue
            if weights:
                m.weight.data = rounded(m.weight.data)
            if activations:
                parent = blocks.get_submodule(name.rpartition(".")[0])
                (parent if isinstance(parent, GELUProjection) else m).register_forward_pre_hook(round_input)

    return transform


# FP8 variants whose fidelity is measured against bf16: engine dtype, and a transform applied to a bf16 engine (then
# the dtype is bf16): linears left in bf16 (`_keep_bf16`), or FP8's rounding emulated in bf16 GEMMs (`_emulate_e4m3`)
FIDELITY_VARIANTS = {
    "fp8": ("fp8", None),
    "fp8+adaln": ("fp8+adaln", None),
    "fp8+fast-accum": ("fp8+fast-accum", None),
    "fp8, blocks 0-7 bf16": ("bf16", _keep_bf16(lambda block, name: block < 8)),
    "fp8, FFN out bf16": ("bf16", _keep_bf16(lambda block, name: name.endswith("net.2"))),
    "e4m3 weights only, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=True, activations=False)),
    "e4m3 activations only, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=False, activations=True)),
    "e4m3 weights + activations, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=True, activations=True)),
}


GROUP = 16  # latents per prompt in the grouped fidelity inputs (a GRPO group)


def fp8_fidelity(sec: Section) -> dict:
    """Rewards of the same random full-size model in bf16 and FP8 variants on n random inputs: Spearman, pair order,
    and the share of the bf16 model's GEMM FLOPs each variant still runs in bf16 GEMMs (a mixed variant's speed cost;
    1 for the emulations). Then n more inputs in prompt groups of `GROUP` latents (one prompt each): the order
    agreement within groups, which is what GRPO's group-normalised advantages see. A variant that fails gets its
    error in place of its numbers; none starts once the section's budget is spent."""
    from engine import RewardEngine

    out = {}
    scores, grouped = {}, {}
    text_len = 205 if Setup.device == "cuda" else None  # Flow-GRPO's T5 length
    for name, (dtype, transform) in {"bf16": ("bf16", None), **FIDELITY_VARIANTS}.items():
        if sec.stopped(f"variant {name}", variant=name):
            break
        try:
            engine = RewardEngine.from_preset(Setup.preset, device=Setup.device, seed=0, **dtype_kwargs(dtype))
            if transform is not None:  # the same bf16 weights, transformed
                transform(engine)
            if name != "bf16":
                out.setdefault("bf16_linear_share", {})[name] = _bf16_linear_share(engine)
            engine.check_finite = False
            scores[name] = _rewards(engine, seed=123, batch=8, text_len=text_len)
            grouped[name] = _rewards(engine, seed=321, batch=GROUP, text_len=text_len, one_prompt=True)
        except Exception as e:
            out[name] = {"error": f"error: {type(e).__name__}: {str(e)[:300]}"}
            log(f"fp8 fidelity, {name}: {out[name]['error']}")
        engine = None
        free_memory()
    if "bf16" not in scores:
        return out
    out["reward_std_bf16"] = float(scores["bf16"].std())
    for name in FIDELITY_VARIANTS:
        if name in scores:
            out[name] = _agreement(scores["bf16"], scores[name])
            out[name]["group_order_agreement"] = _group_order_agreement(grouped["bf16"], grouped[name], GROUP)
    emulated = "e4m3 weights + activations, bf16 GEMMs"
    if {"fp8", emulated} <= set(scores):
        out[f"{emulated} vs the fp8 engine"] = _agreement(scores["fp8"], scores[emulated])
    log(f"fp8 fidelity: {out}")
    return out


def _rewards(engine, seed: int, batch: int, text_len: int | None, one_prompt: bool = False) -> torch.Tensor:
    """Rewards (float64, CPU) of `Setup.fidelity_inputs // batch` batches of `batch` random inputs, drawn in order from
    one generator seeded with `seed` (the same inputs for every engine). `one_prompt`: the batch's first prompt serves
    all its latents (a prompt group)."""
    g = torch.Generator(device=Setup.device).manual_seed(seed)
    rs = []
    for _ in range(Setup.fidelity_inputs // batch):
        z0, emb, pooled, eps = Setup.prompt_inputs(batch, text_len=text_len, generator=g)
        if one_prompt:
            emb, pooled = emb[:1], pooled[:1]
        rs.append(engine.score(z0, (emb, pooled), noise=eps))
    return torch.cat(rs).double().cpu()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How well rewards `b` reproduce reference rewards `a` (same inputs): rank and linear correlation, the share of
    input pairs ordered alike (all pairs, and pairs whose reference rewards differ by > 1% of their std: those an RL
    update can act on), and the error relative to the reference spread."""
    i, j = torch.triu_indices(len(a), len(a), 1)
    agree = (a[i] > a[j]) == (b[i] > b[j])
    clear = (a[i] - a[j]).abs() > 0.01 * a.std()
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return {
        "spearman": float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]),
        "pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
        "pair_order_agreement": float(agree.double().mean()),
        "pair_order_agreement_clear_pairs": float(agree[clear].double().mean()),
        "rms_error_over_std": float((a - b).pow(2).mean().sqrt() / a.std()),
        "max_abs_diff": float((a - b).abs().max()),
    }


def _group_order_agreement(a: torch.Tensor, b: torch.Tensor, group: int) -> float:
    """The share of pairs within each prompt group (consecutive runs of `group` inputs) that rewards `b` order as the
    reference rewards `a` do; pairs across groups do not count (GRPO compares a latent only with its group)."""
    if len(a) != len(b) or len(a) % group:
        raise ValueError(f"need equal lengths that are a multiple of the group size {group}, got {len(a)}, {len(b)}")
    i, j = torch.triu_indices(group, group, 1)
    ga, gb = a.reshape(-1, group), b.reshape(-1, group)
    return float(((ga[:, i] > ga[:, j]) == (gb[:, i] > gb[:, j])).double().mean())


def _bf16_linear_share(engine) -> float:
    """Share of the per-token block-linear weights (∝ GEMM FLOPs) an engine runs in bf16 GEMMs (the rest FP8)."""
    from engine.runtime.fp8 import Float8Linear

    blocks = engine.backbone.transformer_blocks
    sizes = {"fp8": 0, "bf16": 0}
    for name, m in blocks.named_modules():
        if ".norm1" in f".{name}":
            continue
        if isinstance(m, Float8Linear):
            sizes["fp8"] += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear):
            sizes["bf16"] += m.in_features * m.out_features
    return sizes["bf16"] / (sizes["fp8"] + sizes["bf16"])
