"""The HTTP wire format of the reward server: safetensors bodies both ways.

Request (``POST /score``): ``latents [B, C, H, W]``, ``prompt_embeds [P, L, D]``, ``pooled [P, Dp]`` (float32,
bfloat16, float16 or float64), optionally ``prompt_index [B]`` (int64) and at most one of ``noise [B, C, H, W]``,
``seed`` (int64 scalar in [0, 2**63)) or ``fresh_noise`` (bool scalar, true); the noise level ``t`` (a float32 or
float64 scalar, or [B] one per latent; absent: the checkpoint's) and ``add_noise`` (bool scalar; false: the latents
already are x_t at t, a sampler's state, and no noise source is sent). The schema is
`engine.serve.request.ScoreRequest`. Response: ``rewards [B]`` float32, and ``std [B]`` float32 for an uncertainty
head; `decode_response` checks it against the request before anything reads it.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from engine.checks import check_seed
from engine.serve.request import RequestError, ScoreRequest, check_request

RESPONSE_KEYS = ({"rewards"}, {"rewards", "std"})


class ServerResponseError(RuntimeError):
    """A 200 answer that is not what the request asked for (not safetensors, wrong keys, rows or dtype): the server
    or something between it and the client is wrong, not the request."""


def encode_request(
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    prompt_index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    fresh_noise: bool = False,
    *,
    t: float | torch.Tensor | None = None,
    add_noise: bool = True,
) -> bytes:
    """A ``POST /score`` body (tensors are copied to the CPU; dtypes are kept, bf16 included), checked against the
    request schema the server applies (`ScoreRequest`; a `RequestError` names what is wrong). Without noise, seed or
    fresh_noise the server scores with its engine's common noise. ``t`` as `RewardEngine.score` takes it but the
    ensemble: None, a Python float (sent as float64, exactly) or a float tensor [B] (float32/float64, kept);
    ``add_noise=False`` scores the latents as the x_t they are."""
    check_seed(seed)  # a Python int outside int64 cannot become the wire's tensor
    tensors = {
        "latents": latents,
        "prompt_embeds": prompt_embeds,
        "pooled": pooled,
        "prompt_index": None if prompt_index is None else torch.as_tensor(prompt_index).long(),
        "noise": noise,
        "seed": None if seed is None else torch.tensor(seed, dtype=torch.int64),
        "fresh_noise": torch.tensor(True) if fresh_noise else None,
        "t": _noise_level_tensor(t),
        "add_noise": None if add_noise is True else _flag(add_noise),
    }
    request = check_request({k: v for k, v in tensors.items() if v is not None})
    return _save({k: v.detach().contiguous().cpu() for k, v in request.tensors().items()})


def _noise_level_tensor(t: float | torch.Tensor | None) -> torch.Tensor | None:
    """A Python number as a float64 scalar (what the server reads back is the same float); tensors as they are, and
    anything else as itself, for the schema to name."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=torch.float64)
    return t


def _flag(value: bool) -> torch.Tensor:
    """A Python bool as a bool scalar; anything else as itself, for the schema to name."""
    return torch.tensor(value) if isinstance(value, bool) else value


def decode_request(body: bytes) -> ScoreRequest:
    """Parse a ``POST /score`` body and check its envelope; raises `RequestError` (400) with the reason."""
    try:
        tensors = _load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise RequestError(f"body is not a safetensors file ({e}); build it with engine.serve.encode_request") from e
    return check_request(tensors)


def encode_response(outputs: dict[str, torch.Tensor]) -> bytes:
    return _save({k: v.detach().float().contiguous().cpu() for k, v in outputs.items()})


def decode_response(body: bytes, batch: int | None = None) -> dict[str, torch.Tensor]:
    """The outputs of a 200 answer: ``rewards`` [B] float32 (and ``std`` [B]), B = ``batch`` when given. Anything
    else raises `ServerResponseError` naming what was wrong."""
    try:
        outputs = _load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        start = bytes(body[:40])
        raise ServerResponseError(
            f"the server's 200 answer is not a safetensors body ({e}); it starts {start!r}"
        ) from None
    if set(outputs) not in RESPONSE_KEYS:
        raise ServerResponseError(f"the server's answer holds {sorted(outputs)}, expected ['rewards'] or "
                                  "['rewards', 'std']")  # fmt: skip
    rows = (batch,) if batch is not None else (outputs["rewards"].shape[0],) if outputs["rewards"].ndim == 1 else None
    for name, x in outputs.items():
        if x.dtype != torch.float32 or rows is None or tuple(x.shape) != rows:
            expected = f"[{batch if batch is not None else 'B'}] float32 (one per latent)"
            raise ServerResponseError(f"the server's {name} is {str(x.dtype).removeprefix('torch.')} "
                                      f"{list(x.shape)}, expected {expected}")  # fmt: skip
    return outputs


__all__ = [
    "RequestError",
    "ServerResponseError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]
