"""Heads behind one interface: the query-attention head against its equations written out here, the mean-pool head's
keys, and the backbone's readout (full image and text tokens, the deepest block keeping its text stream) against
diffusers' blocks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_inputs, rel_err

from engine.config import PRESETS, QueryAttentionConfig, RewardConfig
from engine.heads import MeanPoolHead, QueryAttentionHead, build_head
from engine.io.backbone import load_backbone
from engine.model.mmdit import BackboneOutputs, Readout
from engine.runtime.backends import Backends


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-trivial (the zero-initialised FiLM and gate layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) + (1.0 if p.ndim == 1 else 0.0) * 0.1)


def rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w


def lin(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, heads = contiguous channel chunks, written with einsum."""
    b, nq, w = q.shape
    d = w // heads
    q, k, v = (x.reshape(b, -1, heads, d) for x in (q, k, v))
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, nq, w)


def reference_head(p, image, text, temb, heads, views=1):
    """DiNa-LRM's head from its equations, on the state dict `p` (independent of engine.heads)."""
    silu = torch.nn.functional.silu

    def film(prefix, x, e):
        if f"{prefix}.proj_in.weight" in p:
            x = lin(p, f"{prefix}.proj_in", x)
        gb = lin(p, f"{prefix}.cond_mlp.2", silu(lin(p, f"{prefix}.cond_mlp.0", e)))
        w = x.shape[-1]
        gamma, beta = gb[:, None, :w], gb[:, None, w:]
        return lin(p, f"{prefix}.proj", x * (1 + gamma) + beta + p[f"{prefix}.layer_embed"])

    def tokens(kind, agg, xs):
        return lin(p, agg, torch.cat([film(f"layer_adapters_{kind}.{j}", x, temb) for j, x in enumerate(xs)], -1))

    v_tok = tokens("visual", "agg_visual", image)
    t_tok = tokens("text", "agg_text", text) if text else None
    if views > 1:
        v_tok = torch.cat(v_tok.chunk(views), dim=1)
        t_tok = None if t_tok is None else torch.cat(t_tok.chunk(views), dim=1)
    q0 = p["query_tokens"].expand(v_tok.shape[0], -1, -1)

    def gate(name, x):
        return torch.sigmoid(lin(p, f"{name}.2", silu(lin(p, f"{name}.0", x))))

    qn = lin(p, "attn1.to_q", rms(q0, p["attn1.norm_q.weight"]))
    vn = rms(v_tok, p["attn1.norm_v.weight"])
    h = attend(qn, lin(p, "attn1.to_k_vis", vn), lin(p, "attn1.to_v_vis", vn) * gate("attn1.gate_vis", vn), heads)
    if t_tok is not None:
        tn = rms(t_tok, p["attn1.norm_t.weight"])
        h = h + attend(
            qn, lin(p, "attn1.to_k_text", tn), lin(p, "attn1.to_v_text", tn) * gate("attn1.gate_text", tn), heads
        )
    q1 = q0 + lin(p, "attn1.to_out.0", h)
    vn2 = rms(v_tok, p["attn2.norm_v.weight"])
    h2 = attend(
        lin(p, "attn2.to_q", rms(q1, p["attn2.norm_q.weight"])),
        lin(p, "attn2.to_k_vis", vn2),
        lin(p, "attn2.to_v_vis", vn2),
        heads,
    )
    q2 = q1 + lin(p, "attn2.to_out.0", h2)
    f = lin(p, "ff.0", rms(q2, p["norm_ff.weight"]))
    q3 = q2 + lin(p, "ff.2", 0.5 * f * (1 + torch.erf(f / math.sqrt(2))))
    return lin(p, "head", q3).mean(dim=1)


@pytest.mark.parametrize(
    "image_layers, text_layers, width, proj_in",
    [
        ((1, 2, 3), (1, 2, 3), None, False),
        ((0, 2), (2,), None, True),
        ((1,), (0, 1), 48, False),
        ((2,), (), None, False),
    ],
)
def test_query_attention_head_matches_its_equations(image_layers, text_layers, width, proj_in):
    dim, heads = 32, 4
    sizes = {"width": width, "num_queries": 3, "num_heads": heads, "outputs": 2, "proj_in": proj_in}
    head = QueryAttentionHead(image_layers, text_layers, dim, **sizes).double()
    randomise(head, seed=len(image_layers) + 7 * len(text_layers))
    g = torch.Generator().manual_seed(3)
    for batch, n_img, n_txt, views in ((3, 15, 7, 1), (2, 1, 5, 1), (2, 9, 13, 3)):
        rows = batch * views
        out = BackboneOutputs(
            pooled=None,
            image=[torch.randn(rows, n_img, dim, generator=g, dtype=torch.float64) for _ in image_layers],
            text=[torch.randn(rows, n_txt, dim, generator=g, dtype=torch.float64) for _ in text_layers],
            temb=torch.randn(rows, dim, generator=g, dtype=torch.float64),
        )
        expected = reference_head(head.state_dict(), out.image, out.text, out.temb, heads, views)
        with torch.no_grad():
            got = head.predict(out, views)
        assert got.shape == (batch, 2)
        assert rel_err(got, expected) < 1e-12
    assert head.readout == Readout(image=image_layers, text=text_layers, temb=True)


def test_fresh_query_attention_head_starts_as_dina_does():
    head = QueryAttentionHead((1,), (1,), 32, num_heads=4)
    adapter = head.layer_adapters_visual[0]
    assert not adapter.cond_mlp[2].weight.any() and not adapter.cond_mlp[2].bias.any()  # gamma = beta = 0
    assert not head.attn1.gate_vis[2].weight.any()  # every gate 0.5
    narrow = QueryAttentionHead((1,), (1,), 32, width=16, num_heads=4)
    assert adapter.proj_in is None and narrow.layer_adapters_visual[0].proj_in is not None  # W != D: a projection


def test_build_head_knows_the_types():
    cfg = PRESETS["tiny"]
    mean_pool = build_head(RewardConfig.for_backbone(cfg), cfg)
    assert isinstance(mean_pool, MeanPoolHead)
    keys = [f"mlp.{i}.{leaf}" for i in (0, 2, 4) for leaf in ("bias", "weight")]
    assert sorted(mean_pool.state_dict()) == keys  # every existing checkpoint's keys
    qa = RewardConfig.for_backbone(
        cfg, layers=(1, 2), text_layers=(2,), head="query_attention", query_attention=QueryAttentionConfig(num_heads=4)
    )
    head = build_head(qa, cfg)
    assert isinstance(head, QueryAttentionHead) and head.readout == Readout(image=(1, 2), text=(2,), temb=True)
    with pytest.raises(ValueError, match="none for a mean_pool head"):
        RewardConfig(layers=(1,), text_layers=(1,))
    with pytest.raises(ValueError, match="final block, which has no text output"):
        RewardConfig.for_backbone(cfg, layers=(1,), text_layers=(3,), head="query_attention")


def test_readout_matches_diffusers_blocks(tiny_transformer):
    """Full image tokens of blocks 0 and 2 and text tokens of blocks 1 and 2 (2, the deepest block run, keeps its
    text stream) equal diffusers' block outputs; temb equals diffusers' time_text_embed."""
    cfg = PRESETS["tiny"]
    readout = Readout(image=(0, 2), text=(1, 2), temb=True)
    backbone = load_backbone(cfg, readout, [tiny_transformer.state_dict()], torch.float32, "cpu")
    assert len(backbone.transformer_blocks) == 3 and hasattr(backbone.transformer_blocks[2], "ff_context")
    z0, pe, po, noise = random_inputs(batch=2, h=10, w=6, text_len=5, seed=4)
    t = 0.3
    cond = backbone.condition(pe, po, t)
    with torch.no_grad():
        out = backbone(z0, cond.context, cond.modulation, t, Backends(kernels="torch"), noise=noise, temb=cond.temb)
    captured = {}
    hooks = [
        tiny_transformer.transformer_blocks[i].register_forward_hook(
            lambda m, a, o, i=i: captured.__setitem__(i, (o[1], o[0]))
        )
        for i in range(3)
    ]
    try:
        with torch.no_grad():
            timestep = torch.full((2,), 1000.0 * t)
            tiny_transformer(
                hidden_states=(1 - t) * z0 + t * noise,
                encoder_hidden_states=pe,
                pooled_projections=po,
                timestep=timestep,
            )
            temb = tiny_transformer.time_text_embed(timestep, po)
    finally:
        for h in hooks:
            h.remove()
    assert out.pooled is None and rel_err(out.temb, temb) < 1e-6
    for got, i in zip(out.image, (0, 2), strict=True):
        assert rel_err(got, captured[i][0]) < 1e-5
    for got, i in zip(out.text, (1, 2), strict=True):
        assert rel_err(got, captured[i][1]) < 1e-5
