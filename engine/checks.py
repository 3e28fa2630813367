"""Input checks of the public API: every user-supplied argument is refused here with a readable error before any
device work. Plain functions over plain values (config, device, flags), so the engine, `GraphedScorer`, the RL
helpers and the pixel front end all check the same way."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from engine.config import BackboneConfig
from engine.schedule import TimeSchedule
from engine.schema import SEED_RANGE

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,  # gradient checks only (torch.autograd.gradcheck), never a serving dtype
    "float64": torch.float64,
}


# The floating-point dtypes `score` and `condition` take (float8 is a weight format of the fp8 engine, not an input).
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_input_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in INPUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)
        raise TypeError(f"{name} must be a floating-point tensor ({names}), got {x.dtype}")


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """The weights' dtype for a constructor's `dtype=` ("fp8" loads bf16 weights, quantised to e4m3 afterwards by
    engine.runtime.fp8); None means `default`."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        if dtype == "fp8":
            return torch.bfloat16
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 or torch.float64, got {dtype}")
    return dtype


def resolve_device(
    device: torch.device | str | int | None, default: torch.device | str | None = None, *, allow_meta: bool = False
) -> torch.device:
    """`device` as a torch.device, refused with a ValueError when it does not parse, names a CUDA device this
    process cannot use, or is "meta" (shapes without values: only loaders that check shapes pass `allow_meta`).
    None means `default`, or CUDA when available else the CPU."""
    if device is None:
        device = default if default is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, a string like 'cuda:0' or 'cpu', or None, got "
                        f"{type(device).__name__}")  # fmt: skip
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if resolved.type == "meta" and not allow_meta:
        raise ValueError(f"device={str(device)!r} holds shapes but no values, so nothing can be scored or drawn "
                         "there: pass 'cpu' or 'cuda'")  # fmt: skip
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} but CUDA is not available here (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}): pass device='cpu', or install a CUDA build of torch on a GPU machine"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} but this process sees {torch.cuda.device_count()} CUDA device(s): pick one "
                f"of cuda:0..cuda:{torch.cuda.device_count() - 1} (see CUDA_VISIBLE_DEVICES)"
            )
    return resolved


def same_device(a: torch.device, b: torch.device) -> bool:
    """`a` is the device `b`, where a bare "cuda" `a` (no index) matches any CUDA `b`."""
    return a == b or (a.type == b.type == "cuda" and a.index is None)


def check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    """`x` on the engine's `device` (a bare "cuda" tensor device matches any CUDA engine device)."""
    if not same_device(x.device, device):
        raise ValueError(f"{name} is on {x.device} but the engine is on {device}: move it with .to(engine.device)")


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first of `tensors` holding NaN or Inf, or None when all are finite: one device sync for all
    of them. Engines skip it with check_finite=False inside captured/compiled loops."""
    flags = [torch.isfinite(x).all() for x in tensors.values()]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return next((name for name, ok in zip(tensors, finite, strict=True) if not ok), None)


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first of `tensors` that holds NaN or Inf (one device sync for all)."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise ValueError(f"{name} contains NaN or Inf values")


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")


def as_prompt_pair(prompt_emb: Any, cfg: BackboneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The SD3 pair `(prompt_embeds, pooled)` out of a `prompt_emb` that is not a Conditioning."""
    if not (
        isinstance(prompt_emb, (tuple, list))
        and len(prompt_emb) == 2
        and all(isinstance(t, torch.Tensor) for t in prompt_emb)
    ):
        raise TypeError(
            "prompt_emb must be the SD3 pair (prompt_embeds [B, L, "
            f"{cfg.joint_attention_dim}], pooled [B, {cfg.pooled_projection_dim}]) or a "
            f"Conditioning from engine.condition(), got {type(prompt_emb).__name__}"
        )
    return prompt_emb[0], prompt_emb[1]


def check_prompts(
    prompt_embeds: torch.Tensor, pooled: torch.Tensor, cfg: BackboneConfig, device: torch.device, *, finite: bool
) -> None:
    """prompt_embeds [P, L, joint_dim] and pooled [P, pooled_dim], floating point, on `device` (finite if asked)."""
    for name, x in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_input_dtype(name, x)
        check_device(name, x, device)
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.joint_attention_dim:
        raise ValueError(
            f"prompt_embeds must be [B, L, {cfg.joint_attention_dim}] (CLIP-L ‖ CLIP-G padded, then "
            f"T5), got {list(prompt_embeds.shape)}"
        )
    if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ValueError(
            f"pooled must be [B, {cfg.pooled_projection_dim}] (CLIP-L ‖ CLIP-G pooled), got {list(pooled.shape)}"
        )
    if prompt_embeds.shape[0] != pooled.shape[0]:
        raise ValueError(f"prompt_embeds and pooled batch sizes differ: {prompt_embeds.shape[0]} vs {pooled.shape[0]}")
    if prompt_embeds.shape[0] == 0 or prompt_embeds.shape[1] == 0:
        raise ValueError(f"empty prompt batch: prompt_embeds has shape {list(prompt_embeds.shape)}")
    if finite:
        check_finite({"prompt_embeds": prompt_embeds, "pooled": pooled})


def check_latents(
    latents: Any, noise: torch.Tensor | None, cfg: BackboneConfig, device: torch.device, *, finite: bool
) -> None:
    """latents [B, C, H, W] that the backbone can patchify and position-embed; noise, if given, of the same shape."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor [B, {cfg.in_channels}, H, W], got {type(latents).__name__}")
    check_input_dtype("latents", latents)
    if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
        raise ValueError(
            f"latents must be [B, {cfg.in_channels}, H, W] transformer-space latents, got {list(latents.shape)}"
        )
    if latents.shape[0] == 0:
        raise ValueError("empty batch: latents has batch size 0")
    p, limit = cfg.patch_size, cfg.patch_size * cfg.pos_embed_max_size
    h, w = latents.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"latents have no pixels: {h}x{w}")
    if h % p or w % p:
        raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {h}x{w}")
    if h > limit or w > limit:
        raise ValueError(
            f"latent size {h}x{w} exceeds this model's positional table: at most {limit}x{limit} "
            f"latent pixels ({limit * 8}x{limit * 8} image pixels)"
        )
    check_device("latents", latents, device)
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor like latents, got {type(noise).__name__}")
        check_input_dtype("noise", noise)
        if noise.shape != latents.shape:
            raise ValueError(f"noise must have the latents' shape {list(latents.shape)}, got {list(noise.shape)}")
        check_device("noise", noise, device)
    if finite:
        check_finite({"latents": latents} if noise is None else {"latents": latents, "noise": noise})


def check_prompt_index(
    prompt_index: Any, batch: int, num_prompts: int, device: torch.device, *, finite: bool
) -> torch.Tensor:
    """prompt_index -> [batch] long on `device`, each in [0, num_prompts). The range check is free for a list or a
    CPU tensor and costs one sync for a device tensor (then only when `finite`)."""
    expected = f"{batch} integers in [0, {num_prompts - 1}] (one prompt row per latent)"
    if isinstance(prompt_index, torch.Tensor):
        check_device("prompt_index", prompt_index, device)
        index = prompt_index
    elif isinstance(prompt_index, (str, bytes)) or not isinstance(prompt_index, (Sequence, np.ndarray)):
        raise TypeError(f"prompt_index must be {expected}, got {type(prompt_index).__name__}")
    else:
        bad = [v for v in prompt_index if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"prompt_index must be {expected}, got an element {bad[0]!r}")
        bad = [v for v in prompt_index if not 0 <= v < num_prompts]  # before int64: 2**70 would overflow
        if bad:
            raise ValueError(f"prompt_index must be {expected}, got {bad[0]}")
        index = torch.tensor([int(v) for v in prompt_index], dtype=torch.long)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"prompt_index must be {expected}, got a {index.dtype} tensor")
    if index.shape != (batch,):
        raise ValueError(f"prompt_index must be {expected}, got shape {list(index.shape)}")
    # (a sequence's values were range-checked above, before the conversion)
    if isinstance(prompt_index, torch.Tensor) and (finite or index.device.type == "cpu"):
        out_of_range = (index < 0) | (index >= num_prompts)
        if bool(out_of_range.any()):
            raise ValueError(f"prompt_index must be {expected}, got {index[out_of_range][0].item()}")
    return index.to(device, torch.long)


def prompt_rows(
    batch: int, num_prompts: int, prompt_index: Any, device: torch.device, *, finite: bool
) -> torch.Tensor | None:
    """The prompt row of each of `batch` latents, [batch] long on `device`; None when latent b uses row b."""
    if prompt_index is not None:
        return check_prompt_index(prompt_index, batch, num_prompts, device, finite=finite)
    if num_prompts == batch:
        return None
    if num_prompts == 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    raise ValueError(
        f"batch sizes disagree: {batch} latents but {num_prompts} prompts; pass one prompt per "
        f"latent, a single prompt, or prompt_index=[...] mapping latents to prompts"
    )


def noise_levels(
    t: Any, batch: int, schedule: TimeSchedule, default: float, add_noise: bool = True
) -> tuple[list[float], int]:
    """The sigma of each forward row and the number of views K, from a score call's `t`:
    None: the checkpoint's t (`default`) for every latent; a float: one t for all; a tensor [batch]: one per latent
    (row b at t[b]); a list or tuple of K floats: the ensemble, every latent at each of the K levels (K B rows,
    view-major), not with `add_noise=False`. Each t goes through `schedule` (the model's time convention)."""
    if t is None:
        t = default
    if isinstance(t, torch.Tensor):
        if t.ndim != 1 or t.shape[0] != batch or not t.is_floating_point():
            raise ValueError(
                f"t as a tensor gives one noise level per latent: a float tensor [{batch}], got {t.dtype} "
                f"{list(t.shape)} "
                f"(a Python list or tuple of floats is a multi-timestep ensemble)"
            )
        values = [float(v) for v in t.tolist()]
        for b, v in enumerate(values):
            schedule.check(v, f"t[{b}]", add_noise)
        return [schedule.sigma(v) for v in values], 1
    if isinstance(t, (list, tuple)):
        if not t:
            raise ValueError("t as a list gives the noise levels of an ensemble: at least one float, got []")
        if not add_noise:
            raise ValueError(
                "an ensemble t=[t1, ..., tK] noises each latent at K levels; add_noise=False (latents already x_t at "
                "one t) does not combine with it"
            )
        for k, v in enumerate(t):
            schedule.check(v, f"t[{k}]", add_noise)
        return [schedule.sigma(v) for v in t for _ in range(batch)], len(t)
    schedule.check(t, "t", add_noise)
    return [schedule.sigma(t)] * batch, 1
