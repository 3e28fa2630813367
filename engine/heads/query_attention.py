"""The query-attention head (DiNa-LRM's structure, arXiv 2602.11146): learned queries read the full image tokens of
chosen blocks and the text tokens of chosen blocks, each first FiLM-modulated by temb (the embedding of the noise
level and the pooled prompt):

    X'_j  = proj_in(X_j) (or X_j)                                    per feature layer j, image and text separately
    g, b  = split(L2(SiLU(L1(temb))))                                FiLM from temb, [W] each
    A_j   = proj((X'_j (1 + g) + b) + e_j)                            e_j a learned per-layer vector, -> [n, W/4]
    V     = agg_v(concat_j A_j^img),  T = agg_t(concat_j A_j^txt)    view tokens [Nv, W], [Nt, W]
    q1    = q0 + out1(Attn(q0', V', V' * gate(V')) + Attn(q0', T', T' * gate(T')))
                                                                     two softmaxes summed; ' = RMSNorm, per input;
                                                                     gate(x) = sigmoid(G2(SiLU(G1(x)))) per token
    q2    = q1 + out2(Attn(q1', V'', V''))                           image tokens only, own norms and weights
    q3    = q2 + FF2(GELU(FF0(RMSNorm(q2))))
    r     = mean over the Q queries of Linear(q3)

Attn is multi-head softmax attention (heads are contiguous W/H channel chunks, scale 1/sqrt(W/H)) with its own
q/k/v projections. RMSNorm has a learnable weight, no bias and eps = the machine epsilon of its input dtype. An
ensemble of K noise levels concatenates the K views' V (and T) along the token axis before attention. Parameter
names follow DiNa-LRM's published `rm_head.pt`, so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.heads.base import RewardHead
from engine.model.mmdit import BackboneOutputs, Readout


class FiLMAdapter(nn.Module):
    """One feature layer's tokens X [R, n, D] and temb [R, D] -> [R, n, W/4]."""

    def __init__(self, dim: int, width: int, proj_in: bool):
        super().__init__()
        self.proj_in = nn.Linear(dim, width) if proj_in or width != dim else None
        self.cond_mlp = nn.Sequential(nn.Linear(dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.proj = nn.Linear(width, width // 4)
        nn.init.zeros_(self.cond_mlp[2].weight)  # gamma = beta = 0 at initialisation
        nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.proj_in is not None:
            x = self.proj_in(x)
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)
        return self.proj(x * (1 + gamma) + beta + self.layer_embed)


def _gate(width: int) -> nn.Sequential:
    """A scalar per token in (0, 1): sigmoid(G2(SiLU(G1(x)))); 0.5 at initialisation."""
    gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
    nn.init.zeros_(gate[2].weight)
    nn.init.zeros_(gate[2].bias)
    return gate


class CrossAttention(nn.Module):
    """Queries attend over image tokens and, with `text`, separately over text tokens (the two results summed);
    `gated`: each value token scaled by its gate."""

    def __init__(self, width: int, heads: int, text: bool, gated: bool):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_v = nn.RMSNorm(width), nn.RMSNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k_vis, self.to_v_vis = nn.Linear(width, width), nn.Linear(width, width)
        self.gate_vis = _gate(width) if gated else None
        if text:
            self.norm_t = nn.RMSNorm(width)
            self.to_k_text, self.to_v_text = nn.Linear(width, width), nn.Linear(width, width)
            self.gate_text = _gate(width) if gated else None
        self.text = text
        self.to_out = nn.Sequential(nn.Linear(width, width))  # (index 0: DiNa-LRM's name; their dropout follows)

    def _attend(self, q: torch.Tensor, x: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear, gate) -> torch.Tensor:
        """Multi-head softmax attention of q [R, Q, W] (projected) over x [R, n, W] (normalised) -> [R, Q, W]."""
        k, v = to_k(x), to_v(x)
        if gate is not None:
            v = v * torch.sigmoid(gate(x))
        r, n, w = k.shape
        heads = (t.view(r, -1, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(r, -1, w)

    def forward(self, q: torch.Tensor, image: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """The update of the queries q [R, Q, W] (the caller adds it to them)."""
        query = self.to_q(self.norm_q(q))
        h = self._attend(query, self.norm_v(image), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if self.text:
            h = h + self._attend(query, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text)
        return self.to_out(h)


class QueryAttentionHead(RewardHead):
    """See the module docstring. `image_layers`/`text_layers`: the blocks (0-based) whose tokens it reads; `dim`:
    the backbone width D; `width`: W (None: D); `outputs`: width of the final projection."""

    def __init__(
        self,
        image_layers: tuple[int, ...],
        text_layers: tuple[int, ...],
        dim: int,
        width: int | None = None,
        num_queries: int = 4,
        num_heads: int = 8,
        outputs: int = 1,
        proj_in: bool = False,
    ):
        super().__init__()
        width = width or dim
        if width % num_heads or width % 4:
            raise ValueError(f"head width {width} must be divisible by num_heads {num_heads} and by 4")
        if not image_layers:
            raise ValueError("a query-attention head reads the image tokens of at least one block")
        self.readout = Readout(image=tuple(image_layers), text=tuple(text_layers), temb=True)
        self.outputs, self.dim, self.width = outputs, dim, width
        self.layer_adapters_visual = nn.ModuleList(FiLMAdapter(dim, width, proj_in) for _ in image_layers)
        self.layer_adapters_text = nn.ModuleList(FiLMAdapter(dim, width, proj_in) for _ in text_layers)
        self.agg_visual = nn.Linear(len(image_layers) * (width // 4), width)
        self.agg_text = nn.Linear(len(text_layers) * (width // 4), width) if text_layers else None
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.attn1 = CrossAttention(width, num_heads, text=bool(text_layers), gated=True)
        self.attn2 = CrossAttention(width, num_heads, text=False, gated=False)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, outputs)

    def tokens(self, outputs: BackboneOutputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The view tokens (V [R, Nv, W], T [R, Nt, W] or None) of each forward row."""
        if outputs.temb is None or len(outputs.image) != len(self.layer_adapters_visual):
            raise ValueError(
                f"the query-attention head reads temb and the image tokens of {len(self.layer_adapters_visual)} "
                f"blocks; the backbone returned {len(outputs.image)} and temb {outputs.temb is not None}"
            )
        dtype = self.query_tokens.dtype
        temb = outputs.temb.to(dtype)

        def view(adapters: nn.ModuleList, agg: nn.Linear, layers: list[torch.Tensor]) -> torch.Tensor:
            return agg(torch.cat([a(x.to(dtype), temb) for a, x in zip(adapters, layers, strict=True)], dim=-1))

        image = view(self.layer_adapters_visual, self.agg_visual, outputs.image)
        text = None if self.agg_text is None else view(self.layer_adapters_text, self.agg_text, outputs.text)
        return image, text

    def predict(self, outputs: BackboneOutputs, views: int = 1) -> torch.Tensor:
        image, text = self.tokens(outputs)
        if views > 1:  # rows view-major -> each latent's K views side by side on the token axis
            image = _side_by_side(image, views)
            text = None if text is None else _side_by_side(text, views)
        q = self.query_tokens.expand(image.shape[0], -1, -1)
        q = q + self.attn1(q, image, text)
        q = q + self.attn2(q, image)
        q = q + self.ff(self.norm_ff(q))
        return self.head(q).mean(dim=1)


def _side_by_side(tokens: torch.Tensor, views: int) -> torch.Tensor:
    """[K B, n, W] (view-major) -> [B, K n, W]: view k's tokens at k n .. (k + 1) n - 1."""
    r, n, w = tokens.shape
    return tokens.view(views, r // views, n, w).transpose(0, 1).reshape(r // views, views * n, w)
