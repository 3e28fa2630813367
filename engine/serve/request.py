"""What a ``POST /score`` request may be: the envelope as one schema, then the engine's own input checks.

`ScoreRequest` names each tensor with its allowed dtypes and rank (and the seed its range); the rules that need the
model (shapes, finite values, prompt rows, ``prompt_index`` range) are `engine.checks`' own, the ones
`engine.score` applies in-process, run by `check_scorable` on each request before it joins a batch. So no request
reaches a batch unless the engine can score it, and a refusal carries the message the in-process call would raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import ConfigDict, PlainValidator, ValidationInfo, model_validator

from engine.checks import INPUT_DTYPES, check_latents, check_prompts, noise_levels, prompt_rows
from engine.schema import SEED_RANGE, Schema, SchemaError, invalid, validate


class RequestError(ValueError):
    """A request the server cannot accept; `status` is the HTTP code to answer with (400 unless stated)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Described(str):
    """A tensor shown in an error as its dtype and shape (a schema error prints repr(got))."""

    def __repr__(self) -> str:
        return str(self)


def describe(x: Any) -> _Described:
    if isinstance(x, torch.Tensor):
        return _Described(f"{str(x.dtype).removeprefix('torch.')} tensor {list(x.shape)}")
    return _Described(f"{type(x).__name__} {x!r:.60}")


@dataclass(frozen=True)
class TensorRule:
    """One wire tensor: its axes (the rank is their count; `or_scalar`: a 0-d tensor too), the dtypes it may have,
    for an integer scalar the range [lo, hi) of its value, for floats the closed interval `within` every (finite)
    value must lie in."""

    axes: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    value_range: tuple[int, int] | None = None
    range_text: str = ""
    or_scalar: bool = False
    within: tuple[float, float] | None = None

    def expected(self) -> str:
        names = [str(d).removeprefix("torch.") for d in self.dtypes]
        dtypes = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        values = " " + self.range_text if self.range_text else ""
        if not self.axes:
            return f"a scalar (0-d tensor) of {dtypes}{values}"
        scalar = "a scalar (0-d tensor) or " if self.or_scalar else ""
        return f"{scalar}a tensor [{', '.join(self.axes)}] of {dtypes}{values}"

    def __call__(self, x: Any, info: ValidationInfo) -> torch.Tensor:
        ranks = (len(self.axes), 0) if self.or_scalar else (len(self.axes),)
        if not isinstance(x, torch.Tensor) or x.dtype not in self.dtypes or x.ndim not in ranks:
            raise invalid(info.field_name, describe(x), self.expected())
        if self.value_range is not None and not self.value_range[0] <= int(x) < self.value_range[1]:
            raise invalid(info.field_name, int(x), self.expected())
        if self.within is not None:
            lo, hi = self.within
            bad = torch.nonzero(~(torch.isfinite(x) & (x >= lo) & (x <= hi)).reshape(-1)).flatten()
            if bad.numel():
                at = int(bad[0])
                name = info.field_name if x.ndim == 0 else f"{info.field_name}[{at}]"
                raise invalid(name, float(x.reshape(-1)[at]), self.expected())
        return x


def _tensor(*axes: str, dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES, **rule: Any) -> Any:
    return Annotated[torch.Tensor, PlainValidator(TensorRule(axes, dtypes, **rule))]


_INT64 = (torch.int64,)
_FLOATS = (torch.float32, torch.float64)


class ScoreRequest(Schema):
    """The tensors of one request (see `engine.serve.wire`). Noise: explicit ``noise``, a ``seed`` (latent b uses
    Philox stream b, as ``engine.score(seed=)``), ``fresh_noise`` (a new draw), or none of them: the engine's common
    noise (one fixed draw per latent shape, so a reward depends on its image and prompt only). Noise level: ``t``, a
    scalar (one level for the request; float64 carries a Python float exactly) or [B] (one per latent), absent: the
    checkpoint's; ``add_noise`` false: the latents already are x_t at t (a sampler's state), no noise is added and
    no noise source may be given. The engine's own rule for t (its checkpoint's range) is checked by
    `check_scorable`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, strict=False)

    latents: _tensor("B", "C", "H", "W")
    prompt_embeds: _tensor("P", "L", "D")
    pooled: _tensor("P", "Dp")
    prompt_index: _tensor("B", dtypes=_INT64) | None = None
    noise: _tensor("B", "C", "H", "W") | None = None
    seed: _tensor(dtypes=_INT64, value_range=SEED_RANGE, range_text="in [0, 2**63)") | None = None
    fresh_noise: _tensor(dtypes=(torch.bool,)) | None = None
    t: _tensor("B", dtypes=_FLOATS, or_scalar=True, within=(0.0, 1.0), range_text="in [0, 1]") | None = None
    add_noise: _tensor(dtypes=(torch.bool,)) | None = None

    @model_validator(mode="after")
    def _one_noise_source(self) -> ScoreRequest:
        given = [name for name in ("noise", "seed", "fresh_noise") if getattr(self, name) is not None]
        if len(given) > 1:
            raise invalid(given[1], describe(getattr(self, given[1])), f"at most one of noise, seed, fresh_noise "
                          f"(got {', '.join(given)})")  # fmt: skip
        if self.fresh_noise is not None and not bool(self.fresh_noise):
            raise invalid("fresh_noise", False, "true, or leave it out for the common noise")
        if given and not self.adds_noise:
            raise invalid(given[0], describe(getattr(self, given[0])), "no noise source with add_noise false (the "
                          "latents already are x_t)")  # fmt: skip
        batch = self.latents.shape[0]
        if self.t is not None and self.t.ndim == 1 and self.t.shape[0] != batch:
            raise invalid("t", describe(self.t), f"a scalar or one level per latent, [{batch}]")
        return self

    @property
    def adds_noise(self) -> bool:
        """Whether the server noises the latents to t (the default) or scores them as the x_t they are."""
        return self.add_noise is None or bool(self.add_noise)

    def noise_level(self) -> float | torch.Tensor | None:
        """`t` as `engine.score` takes it: None (the checkpoint's), a Python float, or a float tensor [B]."""
        if self.t is None or self.t.ndim == 1:
            return self.t
        return float(self.t)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


def check_request(tensors: Any) -> ScoreRequest:
    """The envelope: which tensors, their dtypes and ranks, the seed's range. Raises `RequestError` (400)."""
    if isinstance(tensors, ScoreRequest):
        return tensors
    try:
        return validate(ScoreRequest, tensors, "request")
    except SchemaError as e:
        raise RequestError(str(e)) from None


def check_scorable(request: ScoreRequest, engine: Any, max_prompt_tokens: int) -> None:
    """The engine's input rules (shapes against the model, finite values, prompt rows >= 1, ``prompt_index`` range,
    latents-to-prompts pairing, t in the checkpoint's range) on the CPU, plus the server's prompt-length cap. Raises
    the engine's ValueError or TypeError."""
    cpu, cfg = torch.device("cpu"), engine.config
    check_latents(request.latents, request.noise, cfg, cpu, finite=True)
    check_prompts(request.prompt_embeds, request.pooled, cfg, cpu, finite=True)
    tokens = request.prompt_embeds.shape[1]
    if tokens > max_prompt_tokens:
        raise ValueError(f"prompt_embeds has {tokens} tokens, more than this server's --max-prompt-tokens "
                         f"{max_prompt_tokens} (SD3 pipelines produce 77 CLIP + at most 512 T5 tokens)")  # fmt: skip
    prompt_rows(request.latents.shape[0], request.prompt_embeds.shape[0], request.prompt_index, cpu, finite=True)
    reward = engine.reward_config
    noise_levels(request.noise_level(), request.latents.shape[0], reward.schedule, reward.t, request.adds_noise)
