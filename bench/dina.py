"""A DiNa-LRM-shaped reward (`liuhuohuo/DiNa-LRM-SD35M-12layers`: the first 12 blocks of SD3.5-Medium with a LoRA,
the query-attention head over the image and text tokens of blocks 4/8/12, 1-based), timed two ways in one process
(`python -m bench.latency --reward dina --baselines peft`):

- the engine: `RewardEngine` with that head (`engine.heads.query_attention`), the LoRA merged into the weights at
  load from peft's adapter layout (`engine.io.lora`), as `from_pretrained` loads their published checkpoint;
- the baseline, the way their `DRMInferencer.reward` runs it: diffusers' `SD3Transformer2DModel` modules (patch
  embedding, time + text embedding, context embedder, the first blocks) wrapped by peft's `get_peft_model` (the LoRA
  unmerged, as `PeftModel` runs it: r 64, alpha 128, on the joint and the dual attention's projections), run block by
  block in the model dtype; u snapped to the nearest sigma of diffusers' `FlowMatchEulerDiscreteScheduler` table
  (shift 3); the same head module run eagerly in the model dtype.

Both are built from one seeded random `DinaSource`, so the baseline times the same model the engine does (its
rewards equal the engine's in fp32: tests/test_bench_dina.py). Random weights: latency and memory do not depend on
the values. Their code is not used; the baseline is written from diffusers, peft and this project's head.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.baselines import build_sd3_transformer
from bench.latency_runs import Bench, engine_rows, free_device_memory
from bench.targets import DINA_PEFT
from bench.workload import dtype_kwargs, latent_inputs
from engine import RewardEngine
from engine.config import BackboneConfig, RewardConfig
from engine.heads import QueryAttentionHead, build_head
from engine.io.backbone import load_backbone
from engine.io.dina import DEFAULT_U
from engine.io.lora import read_lora_adapter
from engine.model.mmdit import BackboneOutputs
from engine.schedule import TimeSchedule


@dataclass(frozen=True)
class DinaShape:
    """The blocks the head reads (0-based; image and text tokens alike) and the LoRA's rank and alpha."""

    blocks: tuple[int, ...]
    lora_rank: int
    lora_alpha: int


# backbone depth -> shape: SD3.5-M (24 blocks) as published (blocks 4/8/12 1-based, r 64, alpha 128, scale 2); the tiny
# preset (4 blocks, the last without a text output) reads blocks 0-2, with a rank that fits its width 32 (same scale)
DINA_SHAPES = {24: DinaShape((3, 7, 11), 64, 128), 4: DinaShape((0, 1, 2), 4, 8)}
# the LoRA's target modules (peft matches a name or a suffix ".<name>": the dual attention's attn2 gets them too)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SCHEDULE = TimeSchedule(kind="flow_match_table", num_train_timesteps=1000, shift=3.0)  # SD3.5's scheduler config


def dina_shape(cfg: BackboneConfig) -> DinaShape:
    """The DiNa shape of a backbone of this depth (`DINA_SHAPES`), or a ValueError naming the depths there are."""
    if cfg.num_layers not in DINA_SHAPES:
        raise ValueError(
            f"a DiNa-shaped reward needs a backbone of {' or '.join(map(str, DINA_SHAPES))} blocks (sd35-medium, "
            f"sd3-medium, tiny), this one has {cfg.num_layers}"
        )
    return DINA_SHAPES[cfg.num_layers]


def dina_reward(cfg: BackboneConfig) -> RewardConfig:
    """The reward config of a DiNa-LRM checkpoint on `cfg` (what `engine.io.dina` reads from their config.json)."""
    blocks = dina_shape(cfg).blocks
    reward = RewardConfig(
        layers=blocks, text_layers=blocks, t=DEFAULT_U, head="query_attention", head_hidden=(), schedule=SCHEDULE
    )
    reward.check_against(cfg)
    return reward


class KeptBlocks(nn.Module):
    """What DiNa-LRM keeps of a diffusers `SD3Transformer2DModel` (the modules themselves, not copies), and its
    forward: patch embedding, temb, projected text, then the blocks one after another; the image and text outputs of
    the blocks the head reads are recorded as they come."""

    def __init__(self, transformer: nn.Module, image: tuple[int, ...], text: tuple[int, ...]):
        super().__init__()
        depth = max((*image, *text)) + 1
        self.image, self.text = image, text
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:depth])

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(temb [B, D], image tokens [B, N_img, D] of each read block, text tokens [B, L, D] of each)."""
        hidden = self.pos_embed(x_t)
        temb = self.time_text_embed(timestep, pooled)
        context = self.context_embedder(prompt_embeds)
        image, text = [], []
        for index, block in enumerate(self.transformer_blocks):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            if index in self.image:
                image.append(hidden)
            if index in self.text:
                text.append(context)
        return temb, image, text


class DinaSource:
    """One seeded random DiNa-shaped model: the kept diffusers modules with a peft LoRA attached (`peft`, a
    `PeftModel`; every A and B random and non-zero), their base weights (`base_state`, diffusers' names), and a head
    with every parameter random (the zero-initialised FiLM and gate layers included). Built on `device` in `dtype`."""

    def __init__(self, preset: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        self.cfg = BackboneConfig.from_name(preset)
        self.reward = dina_reward(self.cfg)
        shape = dina_shape(self.cfg)
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)  # diffusers' initialisers draw from the default generator
            transformer = build_sd3_transformer(self.cfg.to_dict(), dtype, device)
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(p: torch.Tensor) -> torch.Tensor:
            return torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32).to(p.dtype)

        kept = KeptBlocks(transformer, self.reward.layers, self.reward.text_layers).eval().requires_grad_(False)
        del transformer  # (the blocks past the deepest read one go with it)
        with torch.no_grad():  # diffusers initialises biases to zero and norm weights to one: perturbed
            for p in kept.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * randn(p))
        lora = LoraConfig(
            r=shape.lora_rank,
            lora_alpha=shape.lora_alpha,
            target_modules=list(LORA_TARGETS),
            init_lora_weights="gaussian",
        )
        self.peft = get_peft_model(kept, lora).eval()
        with torch.no_grad():  # (peft's gaussian init leaves B = 0 and draws A from the default generator)
            for name, p in self.peft.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(randn(p) / p.shape[1] ** 0.5 if "lora_A" in name else 0.02 * randn(p))
        with torch.device(device):
            self.head = build_head(self.reward, self.cfg).eval().requires_grad_(False)
        with torch.no_grad():  # norm weights near one, matrices ~ 1/sqrt(fan-in), the rest of order one
            for name, p in self.head.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.1 * randn(p))
                else:
                    p.copy_(randn(p) / (p.shape[-1] ** 0.5 if p.ndim == 2 else 1))

    @property
    def base_state(self) -> dict[str, torch.Tensor]:
        """The base weights under diffusers' names (peft's `<module>.base_layer.weight` -> `<module>.weight`)."""
        state = self.peft.get_base_model().state_dict()
        return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}

    def to(self, device: torch.device | str) -> DinaSource:
        """The peft model (base weights and LoRA) and the head moved to `device`, in place."""
        self.peft.to(device)
        self.head.to(device)
        return self


def dina_engine(
    source: DinaSource, device: torch.device | str, dtype: str | torch.dtype = "bf16", **options: Any
) -> RewardEngine:
    """The engine on `source`'s weights: the LoRA saved in peft's layout (as DiNa-LRM publishes `backbone_lora/`) and
    merged at load by the engine's own loader, the head copied. `dtype`: bf16 | fp32 | fp8 (a torch dtype or name);
    `options`: the engine's serving options (`RewardEngine`)."""
    from engine.checks import resolve_dtype

    head = copy.deepcopy(source.head)
    compute = resolve_dtype(dtype, torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="dina-lora-") as adapter_dir:
        source.peft.save_pretrained(adapter_dir)
        adapter = read_lora_adapter(adapter_dir)
        backbone = load_backbone(source.cfg, head.readout, [source.base_state], compute, device, adapter)
    return RewardEngine(backbone, head, source.reward, fp8=dtype == "fp8", **options)


class PeftBaseline:
    """DiNa-LRM's inference the way `DRMInferencer.reward(text_conds, latents, u)` computes it, on `source`'s model:
    u -> (sigma, timestep) from a fresh `FlowMatchEulerDiscreteScheduler` table, x_t = (1 - sigma) z0 + sigma eps in
    the latents' dtype, cast to the model dtype, the peft-wrapped blocks, the head in the model dtype."""

    def __init__(self, source: DinaSource, dtype: torch.dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model = source.peft
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, dtype
        self.head: QueryAttentionHead = copy.deepcopy(source.head).to(self.device, dtype)
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=SCHEDULE.num_train_timesteps, shift=SCHEDULE.shift
        )
        self.u = source.reward.t

    def noise_level(self, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, timestep) of the table entry nearest to the target sigma u (the first on a tie)."""
        sigmas = self.scheduler.sigmas.to(self.device)
        index = torch.argmin((sigmas - u).abs())
        return sigmas[index], self.scheduler.timesteps.to(self.device)[index]

    @torch.inference_mode()
    def score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
        u: float | None = None,
    ) -> torch.Tensor:
        """Rewards [B] float32: latents [B, C, H, W] in transformer space, prompts [B, L, joint_dim] / [B, pooled_dim];
        `noise` eps (fresh when None); `u` the noise level (the checkpoint's when None)."""
        sigma, timestep = self.noise_level(self.u if u is None else u)
        eps = torch.randn_like(latents) if noise is None else noise.to(latents.dtype)
        x_t = ((1 - sigma) * latents + sigma * eps).to(self.dtype)
        timesteps = timestep.expand(latents.shape[0])
        temb, image, text = self.model(x_t, timesteps, prompt_embeds, pooled)
        outputs = BackboneOutputs(pooled=None, image=image, text=text, temb=temb)
        return self.head.predict(outputs)[:, 0].float()


def bench_dina(b: Bench, preset: str, resolutions: list[int], dtypes: list[str]) -> None:
    """`bench.latency --reward dina`: the engine's rows in each of `dtypes`, then the diffusers + peft baseline's,
    on one `DinaSource` (model dtype bf16 on a GPU, fp32 on the CPU). Only the model being timed is on the device:
    the source waits in host memory while the engines run, so each row's peak memory is its own model's."""
    device = b.device
    on_gpu = device.type == "cuda"
    model_dtype = torch.bfloat16 if on_gpu else torch.float32
    fields = dict(interface="latent", head="query_attention")
    b.progress(f"building the DiNa-shaped {preset} model (diffusers + peft LoRA + head, random weights)")
    source = None
    with b.guarded("DiNa-shaped model", preset=preset, **fields):  # (e.g. peft missing: one error row says so)
        source = DinaSource(preset, model_dtype, device).to("cpu")
    free_device_memory(device)  # the diffusers model's unused blocks, should a reference cycle hold them
    if source is None:
        return
    for dtype in [] if b.args.no_engine else dtypes:
        with b.guarded("engine", dtype=dtype, **fields):  # a build that fails costs only its dtype
            b.check_injected("engine")
            engine = dina_engine(source, device, **dtype_kwargs(dtype))
            engine_rows(b, engine, resolutions, dtype, head="query_attention")
        engine = None  # (also when its rows failed) freed before the next dtype's engine or the baseline
        free_device_memory(device)
    if "peft" not in (b.args.baselines or []):
        return
    import peft

    label, dtype_name = DINA_PEFT, "bf16" if on_gpu else "fp32"
    common = dict(preset=preset, dtype=dtype_name, random_weights=True, peft=peft.__version__, **fields)
    with b.guarded(label, **common):
        b.check_injected(label)
        baseline = PeftBaseline(source.to(device), model_dtype)
        fn = lambda x: baseline.score(x[0], x[1], x[2])  # noqa: E731
        for side in resolutions:
            for batch in b.args.batch:
                inputs = latent_inputs(source.cfg, batch, side, b.args.text_len, device, model_dtype)
                b.run(label, fn, inputs, batch, resolution=side, **common)
