"""Diffusers baselines that run in the same process as the engine (DESIGN.md, "Where numbers come from").

- `DiffusersHookReward`: what the paper's authors would write. The full diffusers `SD3Transformer2DModel` forward
  (every block, `norm_out`, `proj_out`, unpatchify) with forward hooks mean-pooling the image stream of the chosen
  blocks, then the MLP head.
- `compile_regional`: the same model with each `JointTransformerBlock` under `torch.compile`.
- `compile_whole`: the whole model under one `torch.compile`, CUDA graphs included on a GPU (`mode="reduce-overhead"`
  or `"max-autotune"`): the strongest bf16 peer (label `compile+cudagraphs`).
- `quantize_torchao_fp8`: torchao's dynamic rowwise FP8 on the block linears the engine's `dtype="fp8"` quantises
  (`is_engine_fp8_linear`), to be compiled afterwards: the ecosystem's FP8 peer (label `torchao fp8`).

The HPSv3 baseline (a VLM reading decoded images) is in `bench.hpsv3`.
All weights are random: latency and memory depend on shapes and kernels, not values (say so in every report).
Everything is dtype/device generic: bf16 on a GPU, fp32 on the CPU where the `tiny` variants run.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# Fast random construction


@contextlib.contextmanager
def construct_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Allocate and initialise parameters directly on `device` in `dtype`.

    An 8B model built on the CPU in fp32 takes minutes of single-threaded init and 32 GB of host memory; built under
    the device context with the target default dtype, the default initialisers run as a few hundred GPU kernels.
    Buffers that their modules create with an explicit dtype (diffusers' sincos `pos_embed`, rotary `inv_freq`) keep
    it, so they come out as real values, not the garbage a meta + `to_empty` build would leave.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_sd3_transformer(
    preset_config: Mapping[str, Any], dtype: torch.dtype, device: str | torch.device
) -> SD3Transformer2DModel:
    """A diffusers `SD3Transformer2DModel` with random weights, built on `device` in `dtype`, in eval mode.

    `preset_config` uses diffusers' field names (e.g. `engine.config.BackboneConfig.to_dict()` or a diffusers
    `transformer/config.json`); keys the constructor does not take are ignored. The sincos `pos_embed` is the one
    diffusers computes, cast to `dtype` as `from_pretrained(torch_dtype=dtype)` would.
    """
    params = inspect.signature(SD3Transformer2DModel.__init__).parameters
    kwargs = {k: v for k, v in dict(preset_config).items() if k in params and k != "self"}
    if "dual_attention_layers" in kwargs:
        kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
    with construct_on(device, dtype):
        transformer = SD3Transformer2DModel(**kwargs)
    # Parameters are already in `dtype`; only the fp32 sincos buffer needs the cast (casting the whole ModelMixin
    # would trip diffusers' keep-in-fp32 warning for nothing).
    transformer.pos_embed.to(dtype=dtype)
    return transformer.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# DiT-Reward the naive way: diffusers forward + hooks


def mlp_head(in_features: int, hidden: Sequence[int] = (1024, 256)) -> nn.Sequential:
    """The reward head of Eq. 5: Linear-GELU-...-Linear to one output."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class DiffusersHookReward:
    """DiT-Reward (Eq. 1–5) on an unmodified diffusers `SD3Transformer2DModel` with forward hooks.

    Args:
        transformer: the backbone (optionally after `compile_regional`).
        layers: 0-based indices into `transformer.transformer_blocks` whose image stream is pooled.
        t: noise level of Eq. 1, in (0, 1); the timestep is `1000 * t`.
        head: maps `[B, len(layers) * D]` to `[B, 1]`; default a random `mlp_head(len(layers) * D)` in fp32,
            because the pooled features are fp32 and the head's cost is negligible next to the backbone.
    """

    def __init__(
        self, transformer: SD3Transformer2DModel, layers: Sequence[int], t: float, head: nn.Module | None = None
    ) -> None:
        blocks = transformer.transformer_blocks
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise ValueError("layers must name at least one transformer block")
        bad = [i for i in self.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: this transformer has blocks 0..{len(blocks) - 1}")
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"t must lie in (0, 1), got {t}")
        self.transformer = transformer
        self.t = float(t)
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        if head is None:
            head = mlp_head(len(self.layers) * width).to(self.device).eval().requires_grad_(False)
        self.head = head
        self._pooled: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.layers]

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor | None, torch.Tensor]) -> None:
            # JointTransformerBlock returns (encoder_hidden_states, hidden_states); the image stream is second.
            # Pool here so that only [B, D] per layer outlives the block; accumulate in fp32 (Eq. 3).
            self._pooled[index] = output[1].mean(dim=1, dtype=torch.float32)

        return hook

    def remove(self) -> None:
        """Detach the hooks from the transformer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.inference_mode()
    def features(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features `[B, len(layers), D]` float32.

        Args:
            latents: z0 in the transformer's space, `[B, 16, H/8, W/8]`.
            prompt_embeds: `[B or 1, N_txt, joint_attention_dim]`; a batch of 1 serves every latent.
            pooled: `[B or 1, pooled_projection_dim]`.
            noise: eps of Eq. 1, shaped like `latents`; drawn fresh when None.
        """
        batch = latents.shape[0]
        for name, cond in (("prompt_embeds", prompt_embeds), ("pooled", pooled)):
            if cond.shape[0] not in (1, batch):
                raise ValueError(f"{name} batch must be 1 or match the latents' {batch}, got {cond.shape[0]}")
        z0 = latents.to(self.device, self.dtype)
        eps = torch.randn_like(z0) if noise is None else noise.to(self.device, self.dtype)
        z_t = (1.0 - self.t) * z0 + self.t * eps
        # The SD3 pipeline passes float timesteps (FlowMatch: 1000 * sigma).
        timestep = torch.full((batch,), 1000.0 * self.t, device=self.device, dtype=torch.float32)
        self._pooled.clear()
        self.transformer(
            hidden_states=z_t,
            encoder_hidden_states=prompt_embeds.to(self.device, self.dtype).expand(batch, -1, -1),
            pooled_projections=pooled.to(self.device, self.dtype).expand(batch, -1),
            timestep=timestep,
            return_dict=False,
        )
        features = torch.stack([self._pooled[i] for i in self.layers], dim=1)
        self._pooled.clear()
        return features

    @torch.inference_mode()
    def score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards `[B]` float32 (arguments as in `features`)."""
        features = self.features(latents, prompt_embeds, pooled, noise).flatten(1)
        head_dtype = next(self.head.parameters()).dtype
        return self.head(features.to(head_dtype)).squeeze(-1).float()


def compile_regional(transformer: SD3Transformer2DModel, **compile_kwargs: Any) -> SD3Transformer2DModel:
    """Regional `torch.compile`: each `JointTransformerBlock` compiled, the glue between them eager. In place.

    Defaults `fullgraph=True, dynamic=False`: the benchmark's shapes are fixed per row, and automatic-dynamic would
    recompile the second shape it meets with symbolic sizes, slowing every later row. Blocks share one code object
    (parameters are graph inputs), so all blocks of a kind reuse one graph per shape; the recompile limit is raised
    so that several benchmark shapes never silently fall back to eager.
    """
    compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
    _raise_recompile_limit()
    # diffusers' helper needs the model to declare `_repeated_blocks`; SD3 does not in diffusers 0.42.
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**compile_kwargs)
    else:
        for block in transformer.transformer_blocks:
            block.compile(**compile_kwargs)
    return transformer


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run on this machine (missing hardware or package); its message is the row's reason,
    e.g. "skipped: needs CUDA sm≥8.9"."""


def compile_modes(device: str | torch.device) -> tuple[str, ...]:
    """The `torch.compile` modes `compile_whole` is timed in: on CUDA both modes that capture CUDA graphs (the faster
    one is the peer, both are reported); elsewhere inductor's default, as no CUDA graphs exist there."""
    return ("reduce-overhead", "max-autotune") if torch.device(device).type == "cuda" else ("default",)


def compile_whole(transformer: SD3Transformer2DModel, mode: str = "reduce-overhead") -> SD3Transformer2DModel:
    """The whole `SD3Transformer2DModel` under one `torch.compile(mode=mode)`, in place; the block hooks of a
    `DiffusersHookReward` are traced into the graph (register them before the first call).

    `"reduce-overhead"` and `"max-autotune"` replay the forward as CUDA graphs on a GPU (one launch per call instead
    of thousands, which is what batch 1 needs); on the CPU inductor skips the graphs and `"default"` is the same code.
    `fullgraph=True`: a graph break would split the CUDA graph and misrepresent the peer, so it must fail loudly.
    `dynamic=False`: one static graph per benchmark shape, as a user serving fixed shapes would compile.
    """
    _raise_recompile_limit()
    transformer.compile(mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)
    return transformer


def _raise_recompile_limit() -> None:
    """Several benchmark shapes per compiled code object must never silently fall back to eager."""
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            break


def is_engine_fp8_linear(module: nn.Module, fqn: str) -> bool:
    """torchao `filter_fn`: the linears `engine.runtime.fp8.quantize_fp8` quantises by default, named in diffusers'
    `SD3Transformer2DModel` (`fqn` relative to it): every `nn.Linear` inside `transformer_blocks` except the adaLN
    modulation (`norm1.linear`, `norm1_context.linear`: prompt-only work, kept bf16 by the engine too)."""
    parts = fqn.split(".")
    return (
        isinstance(module, nn.Linear)
        and len(parts) > 2
        and parts[0] == "transformer_blocks"
        and not parts[2].startswith("norm1")
    )


def torchao_fp8_config() -> Any:
    """torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: e4m3 weights with a scale per
    output row, activations quantised per token at run time (the engine's FP8 scheme). Raises `BaselineUnavailable`
    when torchao is not installed (`pip install -e '.[gpu]'`)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError as err:
        raise BaselineUnavailable(f"skipped: torchao not installed ({err}); pip install -e '.[gpu]'") from err
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_torchao_fp8(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """torchao dynamic rowwise FP8 on `is_engine_fp8_linear`'s linears, in place (compile afterwards with
    `compile_whole`). torchao's FP8 GEMMs need FP8 tensor cores: on anything but CUDA compute capability ≥ 8.9 this
    raises `BaselineUnavailable("skipped: needs CUDA sm≥8.9 ...")` before touching the model."""
    device = next(transformer.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = device.type if device.type != "cuda" else "sm{}{}".format(*torch.cuda.get_device_capability(device))
        raise BaselineUnavailable(f"skipped: needs CUDA sm≥8.9 (FP8 tensor cores), this model is on {where}")
    config = torchao_fp8_config()
    from torchao.quantization import quantize_

    quantize_(transformer, config, filter_fn=is_engine_fp8_linear)
    return transformer


__all__ = [
    "BaselineUnavailable",
    "DiffusersHookReward",
    "build_sd3_transformer",
    "compile_modes",
    "compile_regional",
    "compile_whole",
    "construct_on",
    "is_engine_fp8_linear",
    "quantize_torchao_fp8",
    "torchao_fp8_config",
    "mlp_head",
]
