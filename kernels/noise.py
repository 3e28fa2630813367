"""Near-clean noise injection (Eq. 1): ``z_t = (1 - t) * z0 + t * eps``, eps ~ N(0, I).

``t`` is one noise level for the batch (a Python float) or one per image (a float32 ``[B]`` tensor, read by the
kernel: the same single launch, and no host sync, so a CUDA graph can capture it with its t as a static buffer).

With ``seed`` the noise is drawn inside the kernel (Philox4x32-10 + Box-Muller, i.e. ``tl.randn``) and never
materialised. The Philox counter of element ``e`` of image ``b`` is ``(e, b + image_offset, 0, 0)`` and the key is
``seed``, so an image's noise depends on (seed, image index, element) only: it is the same whether the image is scored
alone (``image_offset`` = its index) or inside a batch, and whatever the batch's other images are.

``noise_ref`` reproduces the same Philox integers in pure torch, hence the same normals up to the last bit or two of
``log``/``cos``/``sqrt`` (|difference| ~ 1e-6, not bit-exact: CUDA, the Triton interpreter and torch use different
transcendental implementations).
"""

from __future__ import annotations

import math

import torch

from kernels.backend import accumulation_dtype, cdiv, describe, needs_grad, resolve, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

_BLOCK = 1024
_MAX_COUNTER = 2**32  # element index and image index each fill one 32-bit Philox counter word


@triton_kernel
def _near_clean_kernel(
    z0_ptr, noise_ptr, t_ptr, out_ptr, n_per_image, t, seed, image_offset,
    HAS_NOISE: tl.constexpr, T_PER_IMAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # z_t[b, e] = (1 - t_b) * z0[b, e] + t_b * eps[b, e],  t_b = t_ptr[b] (T_PER_IMAGE) or t,
    # eps = noise[b, e]  or  randn(seed, counter=(e, b + image_offset))
    b = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_per_image
    row = b.to(tl.int64) * n_per_image
    t_b = tl.load(t_ptr + b).to(tl.float32) if T_PER_IMAGE else t
    z0 = tl.load(z0_ptr + row + e, mask=mask).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + row + e, mask=mask).to(tl.float32)
    else:
        # int64 offset: low word -> Philox counter c0 (element), high word -> c1 (image)
        counter = (b + image_offset).to(tl.int64) * 4294967296 + e
        eps = tl.randn(seed, counter)
    z_t = (1.0 - t_b) * z0 + t_b * eps
    tl.store(out_ptr + row + e, z_t.to(out_ptr.dtype.element_ty), mask=mask)


def _near_clean_launch(
    z0: torch.Tensor, noise: torch.Tensor | None, t: float | torch.Tensor, seed: int, image_offset: int
) -> torch.Tensor:
    z0 = z0.contiguous()
    noise = noise.contiguous() if noise is not None else None
    per_image = isinstance(t, torch.Tensor)
    out = torch.empty_like(z0)
    n_batch = z0.shape[0]
    n_per_image = z0[0].numel() if n_batch else 0
    if out.numel() == 0:
        return out
    grid = (cdiv(n_per_image, _BLOCK), n_batch)
    # (absent tensors: any pointer of the right kind, never dereferenced)
    _near_clean_kernel[grid](
        z0, noise if noise is not None else z0, t.contiguous() if per_image else z0, out, n_per_image,
        0.0 if per_image else float(t), seed, image_offset,
        HAS_NOISE=noise is not None, T_PER_IMAGE=per_image, BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip
    return out


def _per_image(t: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    # t broadcastable against a [B, ...] tensor: a float as is, a [B] tensor as [B, 1, ...]
    if isinstance(t, torch.Tensor):
        return t.reshape(-1, *([1] * (like.dim() - 1)))
    return t


class _NearClean(torch.autograd.Function):
    # dz_t/dz0 = (1 - t), dz_t/deps = t   (t per image: broadcast over its elements)
    @staticmethod
    def forward(ctx, z0, noise, t, seed, image_offset):
        ctx.t = t
        ctx.z0_dtype = z0.dtype
        ctx.noise_dtype = noise.dtype if noise is not None else None
        return _near_clean_launch(z0, noise, t, seed, image_offset)

    @staticmethod
    def backward(ctx, grad_out):
        grad_z0 = grad_noise = None
        t = _per_image(ctx.t, grad_out)
        if ctx.needs_input_grad[0]:
            grad_z0 = (grad_out.float() * (1.0 - t)).to(ctx.z0_dtype)
        if ctx.needs_input_grad[1]:
            grad_noise = (grad_out.float() * t).to(ctx.noise_dtype)
        return grad_z0, grad_noise, None, None, None


def near_clean(
    z0: torch.Tensor,
    t: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    image_offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Return the near-clean latent ``z_t = (1 - t) * z0 + t * eps`` (Eq. 1).

    Args:
        z0: clean latents ``[B, C, H, W]`` in the transformer's space (bf16/fp16/fp32).
        t: noise level in (0, 1), e.g. 0.1: a float for every image, or a float32 tensor ``[B]`` on z0's device,
            one per image (no gradient flows to it). A tensor's values are checked with one host sync, except
            while a CUDA graph is being captured.
        noise: explicit ``eps`` with z0's shape (any float dtype); gets gradient ``t * grad`` if it requires grad.
        seed: draw ``eps`` in-kernel from Philox with this seed in [0, 2**63); image ``b`` uses stream
            ``b + image_offset``. With neither ``noise`` nor ``seed`` a seed is drawn from torch's global generator.
        image_offset: index of ``z0[0]`` in the full set of images (for scoring a batch in pieces).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see ``kernels.backend.resolve``).

    Returns:
        ``z_t`` with z0's shape and dtype; arithmetic in fp32.
    """
    _check_near_clean_args(z0, t, noise, seed, image_offset)
    if noise is None and seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if resolve(backend, z0.device) == "torch":
        if noise is None:
            noise = noise_ref(z0.shape, seed, image_offset=image_offset, device=z0.device)
        return near_clean_ref(z0, t, noise, upcast=True)
    t = t if isinstance(t, torch.Tensor) else float(t)
    seed = 0 if seed is None else seed
    if needs_grad(z0, noise):
        return _NearClean.apply(z0, noise, t, seed, image_offset)
    return _near_clean_launch(z0, noise, t, seed, image_offset)


def _check_near_clean_args(
    z0: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor | None, seed: int | None, image_offset: int
) -> None:
    if not isinstance(z0, torch.Tensor) or z0.dim() != 4 or not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor [B, C, H, W], got {describe(z0)}")
    _check_t(t, z0)
    if noise is not None and seed is not None:
        raise ValueError("pass either noise (a tensor) or seed (an int), not both")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {describe(noise)}")
        if noise.shape != z0.shape:
            raise ValueError(f"noise must have z0's shape {tuple(z0.shape)}, got {tuple(noise.shape)}")
        if noise.device != z0.device:
            raise ValueError(f"noise must be on z0's device {z0.device}, got {noise.device}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if (
        isinstance(image_offset, bool)
        or not isinstance(image_offset, int)
        or image_offset < 0
        or image_offset + z0.shape[0] > _MAX_COUNTER
    ):
        raise ValueError(f"image_offset must be an int in [0, 2**32 - B), got {image_offset!r}")
    if math.prod(z0.shape[1:]) > _MAX_COUNTER:
        raise ValueError(f"at most 2**32 elements per image are supported, got {math.prod(z0.shape[1:])}")


def _check_t(t: float | torch.Tensor, z0: torch.Tensor) -> None:
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.float32 or t.shape != (z0.shape[0],) or t.device != z0.device:
            raise ValueError(
                f"t as a tensor must be float32 [B] = [{z0.shape[0]}] on z0's device {z0.device} (one noise level "
                f"per image), got {describe(t)}"
            )
        if t.requires_grad:
            raise ValueError("t must not require grad: near_clean gives no gradient for the noise level")
        capturing = t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and t.numel() and not bool(((t > 0.0) & (t < 1.0)).all()):
            raise ValueError(f"every t must lie in (0, 1) (e.g. 0.1), got {t.tolist()}")
        return
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
        raise ValueError(f"t must be a float in (0, 1) (e.g. 0.1) or a float32 tensor [B], got {t!r}")


# ----------------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------------


def near_clean_ref(
    z0: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor, upcast: bool = False
) -> torch.Tensor:
    """``(1 - t) * z0 + t * noise`` in z0's dtype (``upcast=False``) or in at least fp32, cast back to z0's dtype;
    ``t`` a float or a ``[B]`` tensor (image ``b`` gets ``t[b]``)."""
    compute = accumulation_dtype(z0.dtype) if upcast else z0.dtype
    t = _per_image(t.to(compute), z0) if isinstance(t, torch.Tensor) else t
    return ((1.0 - t) * z0.to(compute) + t * noise.to(compute)).to(z0.dtype)


# Philox4x32-10 constants, as in triton/language/random.py
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # const * x for 32-bit unsigned values held in int64: split x in 16-bit halves so no product exceeds 2**48.
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = const * x_hi, const * x_lo  # < 2**48 each
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_ref(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First two output words of Philox4x32-10 for counters ``(c0, c1, 0, 0)`` and key ``seed`` (int64 tensors)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64))
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale into [0, 1)
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * 4.6566127342e-10


def noise_ref(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    *,
    image_offset: int = 0,
    streams: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The seeded noise of ``near_clean``: float32 ``shape`` = ``[B, ...]``, same Philox stream as the kernel.

    Element ``e`` (flat index within an image) of image ``b`` is ``randn(seed, counter=(e, b + image_offset))``
    (triton's ``tl.randn``: Philox4x32-10, then Box-Muller on the first two words). ``streams`` (``[B]`` integers)
    gives image ``b`` the stream ``streams[b]`` instead: images of one call scored in groups keep their call index.
    """
    n_batch, per_image = shape[0], shape[1:]
    n_elem = 1
    for size in per_image:
        n_elem *= size
    element = torch.arange(n_elem, device=device, dtype=torch.int64)[None, :]
    if streams is None:
        image = torch.arange(image_offset, image_offset + n_batch, device=device, dtype=torch.int64)[:, None]
    else:
        if streams.shape != (n_batch,) or streams.dtype not in (torch.int32, torch.int64) or streams.min() < 0:
            raise ValueError(
                f"streams must be {n_batch} non-negative integers, got {streams.dtype} {list(streams.shape)}"
            )
        image = streams.to(device=device, dtype=torch.int64)[:, None]
    word1, word2 = philox_ref(seed, element, image)
    u1 = _uint32_to_uniform(word1).clamp_min(1.0e-7)
    u2 = _uint32_to_uniform(word2)
    eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return eps.reshape(shape)
