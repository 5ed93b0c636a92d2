"""Triplane transformer: learned plane tokens that read the image tokens.

Shape of the computation::

    x = learned tokens [3 * 32 * 32, 1024]          # three 32x32 planes, row-major, plane-major
    repeat L times:
        x += cross_attn( LN1(x), image tokens )      # keys/values come from the encoder (width 768)
        x += self_attn(  LN2(x) )
        x += mlp(        LN3(x) )                    # 1024 -> 4096 -> GELU -> 1024
    x = LN(x)                                        # eps 1e-6 (the block norms use 1e-5)
    per plane: [1024, 32, 32] --ConvTranspose2d(k=2, s=2)--> [C, 64, 64]

Attention projections carry no biases. Parameter names follow the published
checkpoints (``nn.MultiheadAttention``'s: ``in_proj_weight`` for self-attention,
separate ``q/k/v_proj_weight`` for cross-attention, whose key width differs),
while the attention itself is one SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LRMConfig


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[N, L, D]`` -> ``[N, heads, L, D / heads]``."""
    n, length, dim = t.shape
    return t.view(n, length, heads, dim // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """``[N, heads, L, d]`` -> ``[N, L, heads * d]``."""
    n, h, length, d = t.shape
    return t.transpose(1, 2).reshape(n, length, h * d)


class SelfAttention(nn.Module):
    """Bias-free multi-head self-attention with one packed q/k/v matrix."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.out_proj(_merge(y))


class CrossAttention(nn.Module):
    """Bias-free multi-head attention from ``dim``-wide queries to ``context_dim``-wide keys/values."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.k_proj_weight = nn.Parameter(torch.empty(dim, context_dim))
        self.v_proj_weight = nn.Parameter(torch.empty(dim, context_dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = _heads(F.linear(x, self.q_proj_weight), self.heads)
        k = _heads(F.linear(context, self.k_proj_weight), self.heads)
        v = _heads(F.linear(context, self.v_proj_weight), self.heads)
        return self.out_proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class TriplaneBlock(nn.Module):
    """Cross-attention to the image, self-attention among plane tokens, MLP; pre-norm residuals."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        d = config.decoder_dim
        hidden = d * config.decoder_mlp_ratio
        self.norm1 = nn.LayerNorm(d)  # PyTorch's default eps (1e-5), as trained
        self.cross_attn = CrossAttention(d, config.encoder_dim, config.decoder_heads)
        self.norm2 = nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, config.decoder_heads)
        self.norm3 = nn.LayerNorm(d)
        # Indices 0 and 3 hold the weights (GELU at 1, identity dropouts at 2 and 4), as in the checkpoints.
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, d), nn.Identity())

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm1(x), context)
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class TriplaneTransformer(nn.Module):
    """Image tokens ``[B, T, D_img]`` -> feature planes ``[B, 3, C, 2 * tokens, 2 * tokens]``."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.config = config
        d, n = config.decoder_dim, config.triplane_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * n * n, d) * d**-0.5)
        self.layers = nn.ModuleList(TriplaneBlock(config) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.deconv = nn.ConvTranspose2d(d, config.triplane_channels, kernel_size=2, stride=2)

    def forward(self, image_tokens: Tensor) -> Tensor:
        b = image_tokens.shape[0]
        n = self.config.triplane_tokens
        x = self.pos_embed.expand(b, -1, -1).to(image_tokens.dtype)
        for block in self.layers:
            x = block(x, image_tokens)
        x = self.norm(x)  # [B, 3 * n * n, D]
        # Token (plane p, row i, col j) becomes pixel (i, j) of plane p's [D, n, n] image.
        grids = x.view(b, 3, n, n, -1).permute(0, 1, 4, 2, 3).reshape(b * 3, -1, n, n)
        planes = self.deconv(grids)  # [B * 3, C, 2n, 2n]
        return planes.view(b, 3, *planes.shape[1:])
