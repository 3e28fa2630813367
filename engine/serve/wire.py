"""The HTTP wire format of the reward server: safetensors bodies both ways.

Request (``POST /score``): ``latents [B, C, H, W]``, ``prompt_embeds [P, L, D]``, ``pooled [P, Dp]`` (floating point),
optionally ``prompt_index [B]`` (int64) and either ``noise [B, C, H, W]`` (floating point) or ``seed`` (int64 scalar).
Response: ``rewards [B]`` float32. Only the envelope is checked here (which tensors, their dtype kind and rank); the
shapes and values are the engine's to judge, so a client sees the engine's own message.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from engine.checks import check_seed

REQUIRED = ("latents", "prompt_embeds", "pooled")
OPTIONAL = ("prompt_index", "noise", "seed")
FLOATING = ("latents", "prompt_embeds", "pooled", "noise")


class RequestError(ValueError):
    """A request the server cannot accept; `status` is the HTTP code to answer with (400 unless stated)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def encode_request(
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    prompt_index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
) -> bytes:
    """A ``POST /score`` body (tensors are copied to the CPU; dtypes are kept, bf16 included)."""
    if noise is not None and seed is not None:
        raise ValueError("pass noise or seed, not both")
    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled": pooled}
    if prompt_index is not None:
        tensors["prompt_index"] = torch.as_tensor(prompt_index).long()
    if noise is not None:
        tensors["noise"] = noise
    check_seed(seed)
    if seed is not None:
        tensors["seed"] = torch.tensor(seed, dtype=torch.int64)
    return _save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode_request(body: bytes) -> dict[str, torch.Tensor]:
    """Parse and check the envelope of a ``POST /score`` body; raises `RequestError` (400) with the reason."""
    try:
        tensors = _load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise RequestError(f"body is not a safetensors file ({e}); build it with engine.serve.encode_request") from e
    return check_request(tensors)


def check_request(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The envelope check of `decode_request`, for requests that arrive as tensors (the deployment handle)."""
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise RequestError("a request is a dict of torch.Tensors named as in engine.serve.wire (seed: 0-d int64)")
    missing = [k for k in REQUIRED if k not in tensors]
    extra = sorted(set(tensors) - set(REQUIRED) - set(OPTIONAL))
    if missing or extra:
        raise RequestError(
            f"expected tensors {list(REQUIRED)} (+ optional {list(OPTIONAL)}); missing {missing}, unexpected {extra}"
        )
    if "noise" in tensors and "seed" in tensors:
        raise RequestError("pass noise or seed, not both")
    for name in FLOATING:
        if name in tensors and not tensors[name].is_floating_point():
            raise RequestError(f"{name} must be a floating-point tensor, got {tensors[name].dtype}")
    index = tensors.get("prompt_index")
    if index is not None and (index.dtype != torch.int64 or index.ndim != 1):
        raise RequestError(f"prompt_index must be a 1-D int64 tensor [B], got {index.dtype} {list(index.shape)}")
    if "seed" in tensors and (tensors["seed"].dtype != torch.int64 or tensors["seed"].ndim != 0):
        seed = tensors["seed"]
        raise RequestError(f"seed must be an int64 scalar (0-d tensor), got {seed.dtype} {list(seed.shape)}")
    return tensors


def encode_response(outputs: dict[str, torch.Tensor]) -> bytes:
    return _save({k: v.detach().float().contiguous().cpu() for k, v in outputs.items()})


def decode_response(body: bytes) -> dict[str, torch.Tensor]:
    return _load(body)
