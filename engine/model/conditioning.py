"""What a prompt contributes to the forward at noise level t: the projected text tokens (the prompt alone), and temb
and every block's adaLN vectors (the prompt and t). `MMDiTReward.condition` makes one; `MMDiTReward.forward` reuses
it for every latent scored against it, at any t it holds or can make."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from engine.checks import check_device, first_nonfinite
from engine.config import BackboneConfig
from engine.lru import LRUCache

# (modulation [P, M, D], temb [P, D]) of the prompts at one noise level, and what makes them from pooled
Level = tuple[torch.Tensor, torch.Tensor | None]
MakeLevel = Callable[[torch.Tensor, float], Level]

# Noise levels kept per Conditioning besides its own: a sampler visits one per step (28 to 50), an ensemble a few.
LEVELS_KEPT = 64


@dataclass
class Conditioning:
    """The prompt-only part (`context`, `pooled`) and the (prompt, t) part at `t` (`modulation`, `temb`).

    Built by `MMDiTReward.condition`; leading dimension P = number of prompts. `at(t, make)` gives the (prompt, t)
    part at another noise level, made once and kept (a bounded cache keyed by the exact t: a sampler has a fixed set
    of timesteps; `hits`/`misses` count its use). `rows(...)` maps it onto a batch of latents (one prompt serving a
    GRPO group, one t per latent): gathers, whatever the depth, because the vectors are packed.

    One built by hand needs only `context`, `modulation` and `t`: it serves that t, and a head that reads temb
    only with `temb`. Thread-safe: two threads may score against one Conditioning."""

    context: torch.Tensor  # [P, L, D] context_embedder(prompt_embeds)
    modulation: torch.Tensor  # [P, M, D] all blocks' (shift, scale, gate) vectors at t, block after block
    t: float  # the noise level (sigma) of `modulation` and `temb`
    temb: torch.Tensor | None = None  # [P, D] temb at t (timestep and pooled text): the query-attention FiLM input
    pooled: torch.Tensor | None = None  # [P, pooled_dim] in the engine dtype: makes other noise levels
    # Who made it: (the engine's identity token, the version of its prompt-path weights then). None for one built
    # by hand, which the engine accepts after checking it is finite; a Conditioning from another engine, or from
    # this one before its weights changed, is refused (same shapes, different numbers).
    origin: tuple[object, int] | None = None
    # the other levels made so far, and how often `at` found / made one (fresh in every copy `replace` makes)
    levels: LRUCache[float, Level] = field(init=False, repr=False, compare=False)
    hits: int = field(init=False, compare=False)
    misses: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.levels, self.hits, self.misses = LRUCache(LEVELS_KEPT), 0, 0
        self._lock = threading.Lock()
        rows = {name: x.shape[0] for name, x in self._tensors().items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"a Conditioning's tensors must have one row per prompt, got {rows}")

    @property
    def num_prompts(self) -> int:
        return self.context.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = {"context": self.context, "modulation": self.modulation, "temb": self.temb, "pooled": self.pooled}
        return {name: x for name, x in named.items() if x is not None}

    def check_finite(self) -> None:
        """ValueError if any vector is NaN/Inf (one device sync). Not run on construction: CUDA graph capture builds
        Conditionings of static buffers, where a sync is not allowed."""
        name = first_nonfinite(self._tensors())
        if name is not None:
            raise ValueError(
                f"Conditioning.{name} contains NaN or Inf values: made by hand with them, or the prompt "
                "embeddings overflowed the prompt path (check prompt_embeds/pooled for huge values)"
            )

    def at(self, t: float, make: MakeLevel) -> Level:
        """(modulation [P, M, D], temb [P, D] or None) at noise level t: its own, a kept one, or `make(pooled, t)`
        (kept). With adaLN weights on the host, each new t streams them to the device once."""
        if t == self.t:
            level: Level | None = (self.modulation, self.temb)
        else:
            level = self.levels.get(t)
        with self._lock:
            if level is not None:
                self.hits += 1
                return level
            self.misses += 1
        if self.pooled is None:
            raise ValueError(
                f"this Conditioning holds t={self.t} only (built by hand, without pooled): it cannot serve t={t}; "
                f"make it with engine.condition(prompt_embeds, pooled)"
            )
        level = make(self.pooled, t)
        self.levels.put(t, level)
        return level

    def rows(self, prompts: torch.Tensor | None, levels: Sequence[float], make: MakeLevel) -> Conditioning:
        """The Conditioning row of each forward row r: prompt `prompts[r % B]` (None: row r % B, P == B) at noise
        level `levels[r]` ([R] floats, R a multiple of the B latents). Its `t` is the one level, or those of the
        rows ([R] float32 tensor)."""
        distinct = sorted(set(levels))
        made = [self.at(t, make) for t in distinct]
        batch = self.num_prompts if prompts is None else prompts.shape[0]
        repeats = len(levels) // batch
        device = self.context.device
        if prompts is None and repeats == 1 and distinct == [self.t]:
            return self  # the common case, no copy
        if prompts is None:
            prompts = torch.arange(batch, device=device)
        prompts = prompts.repeat(repeats)
        if len(distinct) == 1:
            at, t = prompts, distinct[0]
        else:  # rows of the levels' stacked vectors: level k, prompt p -> k P + p
            slot = torch.tensor([distinct.index(t) for t in levels], device=device)
            at, t = slot * self.num_prompts + prompts, torch.tensor(list(levels), dtype=torch.float32, device=device)
        modulation = torch.cat([m for m, _ in made]).index_select(0, at)
        temb = None if made[0][1] is None else torch.cat([e for _, e in made]).index_select(0, at)
        return replace(
            self,
            context=self.context.index_select(0, prompts),
            modulation=modulation,
            t=t,  # type: ignore[arg-type]  (a per-row Conditioning is what a forward reads, never cached further)
            temb=temb,
            pooled=None,
        )

    def select(self, index: torch.Tensor) -> Conditioning:
        """Rows `index` of the prompts (other kept levels are made again on demand)."""
        return replace(self, **{name: x.index_select(0, index) for name, x in self._tensors().items()})

    @classmethod
    def concat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The prompts of `parts` (made at one t by one engine) as one Conditioning."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if any(p.t != first.t or p.origin != first.origin for p in parts):
            raise ValueError("Conditioning.concat needs parts made at one t by one engine (same origin)")
        tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in first._tensors()}
        return replace(first, **tensors)


def check_conditioning_fits(
    cond: Conditioning, cfg: BackboneConfig, n_vectors: int, dtype: torch.dtype, device: torch.device
) -> None:
    """A Conditioning whose shapes, dtype and device fit the engine (`n_vectors` adaLN vectors per prompt); where
    it came from is the engine's own check."""
    dim = cfg.hidden_size
    context, modulation = cond.context, cond.modulation
    if (
        modulation.ndim != 3
        or modulation.shape[1:] != (n_vectors, dim)
        or context.ndim != 3
        or context.shape[0] != modulation.shape[0]
        or context.shape[-1] != dim
    ):
        raise ValueError(
            f"this Conditioning does not fit the engine (context {list(context.shape)}, modulation "
            f"{list(modulation.shape)}; expected [P, L, {dim}] and [P, {n_vectors}, {dim}]): make it with this "
            f"engine's condition()"
        )
    if context.dtype != dtype or modulation.dtype != dtype:
        raise ValueError(f"Conditioning is {modulation.dtype}, the engine computes in {dtype}: re-condition")
    check_device("Conditioning", context, device)
