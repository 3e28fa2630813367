"""Shared fixtures: tiny random diffusers SD3 transformers (the numerical reference) and reference features."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the CPU interpreter in tests

import pytest
import torch

from engine.config import PRESETS

# Tiny configs of the three backbone variants (diffusers SD3Transformer2DModel kwargs).
TINY_VARIANTS = {
    "sd35-large-like": dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=()),
    "sd35-medium-like": dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3-medium-like": dict(num_layers=4, qk_norm=None, dual_attention_layers=()),
}


def tiny_diffusers_config(**overrides) -> dict:
    """The `tiny` preset as diffusers `SD3Transformer2DModel` kwargs (one source of truth for its sizes)."""
    return {**PRESETS["tiny"].to_dict(), "out_channels": PRESETS["tiny"].in_channels, **overrides}


def make_diffusers_transformer(seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny diffusers SD3Transformer2DModel with random weights, adaLN and norm weights perturbed so that no
    weight is a trivial zero/one (diffusers initialises some to zero, which would hide bugs)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**tiny_diffusers_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "linear" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def reference_features(model, z0, prompt_embeds, pooled, noise, t, layers, dtype=torch.float32) -> torch.Tensor:
    """Independent reference (what the paper's authors would write): the full diffusers forward on
    z_t = (1-t) z0 + t eps at timestep 1000 t, forward hooks on the selected blocks, mean over image tokens in fp32."""
    captured = {}
    hooks = [
        model.transformer_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[1]))
        for i in layers
    ]
    try:
        z_t = ((1 - t) * z0.double() + t * noise.double()).to(dtype)
        timestep = torch.full((z0.shape[0],), 1000.0 * t, dtype=torch.float32)
        with torch.no_grad():
            model(
                hidden_states=z_t,
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                timestep=timestep,
            )
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([captured[i].float().mean(dim=1) for i in layers], dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


FP32_REL_TOL = 1e-5


def outputs_and_grads(fn, inputs, cotangents):
    """Outputs and input gradients of fn(*inputs) under the given (random) cotangents."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents, strict=True))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], list(grads)


def assert_within_rule(kernel_out, lowp_out, truth, dtype, what=""):
    """STYLE.md: err(kernel vs truth) <= 2 * err(torch-in-low-precision vs truth) + eps."""
    for i, (k, low, ref) in enumerate(zip(kernel_out, lowp_out, truth, strict=True)):
        bound = FP32_REL_TOL if dtype == torch.float32 else 2 * rel_err(low, ref) + FP32_REL_TOL
        err = rel_err(k, ref)
        assert err <= bound, f"{what}[{i}] ({dtype}): rel err {err:.3g} > bound {bound:.3g}"


def check_against_reference(op, ref, inputs, n_outputs, dtype, what=""):
    """A Triton op vs its torch reference, forward and backward: outputs and gradients keep the inputs' dtype and
    shape, and both obey the STYLE.md rule against the fp64 reference."""
    torch.manual_seed(1)
    out_shape = inputs[0].shape
    cotangents = [torch.randn(out_shape, dtype=torch.float64, device=inputs[0].device) for _ in range(n_outputs)]
    k_out, k_grad = outputs_and_grads(lambda *a: op(*a, backend="triton"), inputs, cotangents)
    low_out, low_grad = outputs_and_grads(ref, inputs, cotangents)
    truth_out, truth_grad = outputs_and_grads(ref, [t.detach().double() for t in inputs], cotangents)
    for o, i in zip(k_out, [inputs[0]] * n_outputs, strict=True):
        assert o.dtype == i.dtype and o.shape == i.shape
    for g, i in zip(k_grad, inputs, strict=True):
        assert g.dtype == i.dtype and g.shape == i.shape
    assert_within_rule(k_out, low_out, truth_out, dtype, f"{what} forward")
    assert_within_rule(k_grad, low_grad, truth_grad, dtype, f"{what} backward")


def assert_e4m3_agreement(q, scale, q_ref, scale_ref) -> None:
    """Same quantisation up to fp32 summation order: scales to ~1 ulp, and codes equal except where the two fp32 values
    straddle a rounding boundary, which moves a code by one step of the e4m3 grid."""
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    a, b = q.float() * scale, q_ref.float() * scale_ref
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert float(differ.float().mean()) < 0.01
    step = b.abs().clamp_min(2.0**-6 * scale_ref).div(8) * 1.001  # one e4m3 step (3 mantissa bits) at |b|
    assert bool(((a - b).abs() <= step + 1e-30)[differ].all())


def random_inputs(batch=3, h=12, w=8, text_len=11, seed=0, cfg=None):
    cfg = cfg or tiny_diffusers_config()
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, cfg["in_channels"], h, w, generator=g)
    prompt_embeds = torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    noise = torch.randn(batch, cfg["in_channels"], h, w, generator=g)
    return z0, prompt_embeds, pooled, noise


@pytest.fixture(scope="session")
def tiny_transformer():
    return make_diffusers_transformer()
