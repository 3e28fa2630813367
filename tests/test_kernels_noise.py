"""Near-clean noise injection (Eq. 1): the fused kernel vs its reference, and the in-kernel Philox noise."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import math

import pytest
import torch
from conftest import assert_within_rule, outputs_and_grads, rel_err

from kernels import backend as kernel_backend
from kernels.noise import near_clean, near_clean_ref, noise_ref, philox_ref

pytestmark = pytest.mark.skipif(not kernel_backend.triton_available(), reason="triton is not installed")

T = 0.1
SHAPES = [(2, 16, 8, 8), (1, 3, 5, 7), (5, 1, 1, 1)]


def recovered_noise(z0: torch.Tensor, t: float, seed: int, **kwargs) -> torch.Tensor:
    """eps = (z_t - (1 - t) z0) / t from a seeded near_clean call (fp32; error ~1e-6, far below the statistics)."""
    z_t = near_clean(z0, t, seed=seed, **kwargs)
    return (z_t.double() - (1 - t) * z0.double()) / t


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_near_clean_with_noise_matches_reference(shape, dtype):
    torch.manual_seed(0)
    z0 = torch.randn(shape).to(dtype).requires_grad_(True)
    noise = torch.randn(shape).to(dtype).requires_grad_(True)
    cotangent = torch.randn(shape, dtype=torch.float64)

    def run(fn, *inputs):
        out = fn(*inputs)
        return out.detach(), torch.autograd.grad((out.double() * cotangent).sum(), inputs)

    k_out, k_grads = run(lambda z, n: near_clean(z, T, noise=n, backend="triton"), z0, noise)
    low_out, low_grads = run(lambda z, n: near_clean_ref(z, T, n), z0, noise)
    truth_out, truth_grads = run(
        lambda z, n: near_clean_ref(z, T, n),
        z0.detach().double().requires_grad_(),
        noise.detach().double().requires_grad_(),
    )
    assert k_out.dtype == dtype and k_out.shape == shape
    for k, low, truth in zip([k_out, *k_grads], [low_out, *low_grads], [truth_out, *truth_grads], strict=True):
        bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(low, truth) + 1e-5
        assert rel_err(k, truth) <= bound


def test_near_clean_noise_without_grad_gets_none():
    torch.manual_seed(0)
    z0 = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = near_clean(z0, 0.25, noise=torch.randn(2, 4, 3, 3), backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), [z0])
    assert torch.allclose(grad, torch.full_like(z0, 0.75))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_near_clean_grad_and_dtype(dtype):
    torch.manual_seed(0)
    z0 = torch.randn(2, 4, 3, 5).to(dtype).requires_grad_(True)
    out = near_clean(z0, 0.25, seed=7, backend="triton")
    assert out.dtype == dtype and out.shape == z0.shape
    (grad,) = torch.autograd.grad(out.float().sum(), [z0])
    assert grad.dtype == dtype and torch.allclose(grad.float(), torch.full(z0.shape, 0.75))


def test_philox_ref_matches_triton_bits():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out0_ptr, out1_ptr, seed, image, N: tl.constexpr):
        e = tl.arange(0, N)
        c0, c1, _, _ = tl.randint4x(seed, image.to(tl.int64) * 4294967296 + e)
        tl.store(out0_ptr + e, c0.to(tl.int32, bitcast=True))
        tl.store(out1_ptr + e, c1.to(tl.int32, bitcast=True))

    for seed, image in [(0, 0), (123, 5), (2**40 + 77, 2**31 + 3)]:
        out0, out1 = torch.empty(256, dtype=torch.int32), torch.empty(256, dtype=torch.int32)
        words[(1,)](out0, out1, seed, image, N=256)
        ref0, ref1 = philox_ref(seed, torch.arange(256), torch.tensor(image))
        assert torch.equal(out0.long() & 0xFFFFFFFF, ref0) and torch.equal(out1.long() & 0xFFFFFFFF, ref1)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_reproduces_triton_noise(shape):
    torch.manual_seed(0)
    z0 = torch.randn(shape)
    triton_eps = recovered_noise(z0, 0.5, seed=11, backend="triton")
    torch_eps = recovered_noise(z0, 0.5, seed=11, backend="torch")
    assert (triton_eps - torch_eps).abs().max() < 1e-5  # same Philox bits; transcendentals may differ in the last ulp
    assert (triton_eps - noise_ref(shape, 11).double()).abs().max() < 1e-5


def test_seeded_noise_statistics():
    torch.manual_seed(0)
    z0 = torch.randn(4, 16, 32, 32)  # 16384 elements per image
    eps = recovered_noise(z0, 0.5, seed=2024, backend="triton")
    n, per_image = eps.numel(), eps[0].numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 5 / math.sqrt(2 * n)
    flat = eps.reshape(4, -1)
    for i in range(3):
        assert abs(corr(flat[i], flat[i + 1])) < 5 / math.sqrt(per_image)  # between images
    assert abs(corr(flat[:, :-1], flat[:, 1:])) < 5 / math.sqrt(n)  # between neighbouring elements
    assert abs(corr(eps[:, :, :-1], eps[:, :, 1:])) < 5 / math.sqrt(n)  # between neighbouring rows (stride W)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seeded_noise_is_a_function_of_seed_image_and_element(backend):
    torch.manual_seed(0)
    z0 = torch.randn(5, 4, 6, 6)
    batch = near_clean(z0, T, seed=3, backend=backend)
    assert torch.equal(batch, near_clean(z0, T, seed=3, backend=backend))
    for i in range(5):
        alone = near_clean(z0[i : i + 1], T, seed=3, image_offset=i, backend=backend)
        assert torch.equal(alone, batch[i : i + 1])
    tail = near_clean(z0[2:], T, seed=3, image_offset=2, backend=backend)
    assert torch.equal(tail, batch[2:])
    other_seed = near_clean(z0, T, seed=4, backend=backend)
    assert (other_seed != batch).float().mean() > 0.99
    shifted = near_clean(z0, T, seed=3, image_offset=1, backend=backend)
    assert (shifted != batch).float().mean() > 0.99


def test_unseeded_noise_follows_torch_global_rng():
    torch.manual_seed(5)
    z0 = torch.randn(2, 4, 3, 3)
    torch.manual_seed(6)
    first = near_clean(z0, T, backend="triton")
    torch.manual_seed(6)
    assert torch.equal(first, near_clean(z0, T, backend="triton"))
    assert not torch.equal(first, near_clean(z0, T, backend="triton"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"t": 0.0}, ValueError, r"\(0, 1\)"),
        ({"t": 1.5}, ValueError, r"\(0, 1\)"),
        ({"noise": torch.randn(2, 4, 3, 4)}, ValueError, "z0's shape"),
        ({"noise": torch.randn(2, 4, 3, 3), "seed": 1}, ValueError, "not both"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, ValueError, "seed"),
        ({"seed": 1, "image_offset": -2}, ValueError, "image_offset"),
        ({"seed": 1, "image_offset": "a"}, ValueError, "image_offset must be an int"),
        ({"seed": 1, "image_offset": True}, ValueError, "image_offset must be an int"),
        ({"z0": torch.randn(4, 3, 3)}, TypeError, r"\[B, C, H, W\]"),
        ({"noise": torch.randn(2, 4, 3, 3, device="meta")}, ValueError, "device"),
        ({"t": "0.1"}, ValueError, "float"),
        ({"t": torch.tensor([0.1, 0.2], dtype=torch.float64)}, ValueError, r"float32 \[B\] = \[2\]"),
        ({"t": torch.tensor([0.1, 0.2, 0.3])}, ValueError, r"float32 \[B\] = \[2\]"),
        ({"t": torch.tensor(0.1)}, ValueError, r"float32 \[B\]"),
        ({"t": torch.tensor([0.1, 1.0])}, ValueError, r"every t must lie in \(0, 1\)"),
        ({"t": torch.tensor([float("nan"), 0.1])}, ValueError, r"every t must lie in \(0, 1\)"),
        ({"t": torch.tensor([0.1, 0.2], requires_grad=True)}, ValueError, "must not require grad"),
    ],
)
def test_near_clean_rejects_bad_arguments(kwargs, error, match):
    args = {"z0": torch.randn(2, 4, 3, 3), "t": T, **kwargs}
    with pytest.raises(error, match=match):
        near_clean(args.pop("z0"), args.pop("t"), backend="triton", **args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_near_clean_of_an_empty_batch_is_empty(backend):
    assert near_clean(torch.zeros(0, 4, 3, 3), T, seed=1, backend=backend).shape == (0, 4, 3, 3)


def per_image_t(n: int) -> torch.Tensor:
    return torch.empty(n).uniform_(0.02, 0.98)  # float32, one noise level per image


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SHAPES, (3, 5, 9, 11)])
def test_near_clean_per_image_t_matches_reference(shape, dtype):
    torch.manual_seed(1)
    t = per_image_t(shape[0])
    z0, noise = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    cotangent = torch.randn(shape, dtype=torch.float64)
    kernel = outputs_and_grads(lambda z, n: near_clean(z, t, noise=n, backend="triton"), [z0, noise], [cotangent])
    low = outputs_and_grads(lambda z, n: near_clean_ref(z, t, n), [z0, noise], [cotangent])
    t64 = t.double()[:, None, None, None]
    truth_out = (1 - t64) * z0.double() + t64 * noise.double()  # written out: independent of near_clean_ref
    truth = [truth_out, (1 - t64) * cotangent, t64 * cotangent]
    assert kernel[0][0].dtype == dtype and kernel[0][0].shape == shape
    assert_within_rule([*kernel[0], *kernel[1]], [*low[0], *low[1]], truth, dtype, "near_clean per-image t")
    torch_out = near_clean(z0, t, noise=noise, backend="torch")
    assert_within_rule([torch_out], low[0], truth[:1], dtype, "torch backend")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seeded_near_clean_per_image_t_is_each_image_alone(backend):
    # image b with t[b] gets exactly what a call for it alone with the float t[b] gets: same noise stream, same
    # fp32 noise level, same arithmetic (bit-equal by construction)
    torch.manual_seed(2)
    z0 = torch.randn(4, 3, 5, 7)
    t = per_image_t(4)
    batch = near_clean(z0, t, seed=9, backend=backend)
    for b in range(4):
        alone = near_clean(z0[b : b + 1], t[b].item(), seed=9, image_offset=b, backend=backend)
        assert torch.equal(batch[b : b + 1], alone)
    eps = noise_ref(z0.shape, 9).double()
    truth = (1 - t.double()[:, None, None, None]) * z0.double() + t.double()[:, None, None, None] * eps
    assert (batch.double() - truth).abs().max() < 1e-5  # the Philox reference, written out


def test_near_clean_per_image_t_is_one_launch_and_no_autograd_function_without_grad(monkeypatch):
    from kernels import noise as noise_module

    launches = []

    def refuse(*args):
        raise AssertionError("an inference call went through the autograd Function")

    monkeypatch.setattr(noise_module._NearClean, "apply", refuse)
    z0 = torch.randn(3, 2, 4, 5)
    with kernel_backend.observe_launches(lambda kernel, args, kwargs: launches.append(kwargs)):
        with torch.no_grad():
            near_clean(z0.requires_grad_(True), per_image_t(3), noise=torch.randn(3, 2, 4, 5), backend="triton")
        near_clean(z0.detach(), per_image_t(3), seed=1, backend="triton")
    assert [launch["T_PER_IMAGE"] for launch in launches] == [True, True]
