"""Image encoder: a DINO ViT-B/16 whose every block is modulated by its view's camera.

Shape of the computation, per view::

    image [3, S, S] in [0, 1] --normalise--> patches (conv k=s=16) + CLS
        + positional table (bicubic-resampled from 14x14 when S != 224)
    camera [16] --Linear-SiLU-Linear--> c [D]
    repeat L times:
        (shift_a, scale_a, shift_m, scale_m) = Linear(SiLU(c))          # adaLN, no gate
        x += attn( LN(x) * (1 + scale_a) + shift_a )
        x += mlp(  LN(x) * (1 + scale_m) + shift_m )
    tokens = LN(x)                                                      # [1 + (S/16)^2, D]

Parameter names follow the published checkpoints (the Hugging Face ``ViTModel``
layout under ``model.`` plus ``camera_embedder``), so a state dict loads
strictly; the modules themselves are written for this package. Attention runs
through :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LRMConfig


class _Projection(nn.Module):
    """A linear map stored as ``dense`` (the checkpoint's name for it)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class _QKV(nn.Module):
    """Query, key and value projections (with biases) of a self-attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class _SelfAttention(nn.Module):
    """Multi-head self-attention: ``attention`` holds q/k/v, ``output`` the output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _QKV(dim)
        self.output = _Projection(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape

        def split(t: Tensor) -> Tensor:  # [N, L, D] -> [N, heads, L, D / heads]
            return t.view(n, length, self.heads, dim // self.heads).transpose(1, 2)

        qkv = self.attention
        y = F.scaled_dot_product_attention(split(qkv.query(x)), split(qkv.key(x)), split(qkv.value(x)))
        return self.output(y.transpose(1, 2).reshape(n, length, dim))


class CameraModulatedBlock(nn.Module):
    """A pre-norm ViT block whose two norms are shifted and scaled by the camera embedding."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        d = config.encoder_dim
        self.attention = _SelfAttention(d, config.encoder_heads)
        self.intermediate = _Projection(d, config.encoder_mlp_dim)
        self.output = _Projection(config.encoder_mlp_dim, d)
        self.layernorm_before = nn.LayerNorm(d, eps=config.encoder_ln_eps)
        self.layernorm_after = nn.LayerNorm(d, eps=config.encoder_ln_eps)
        # Index 1 holds the weights (index 0 is the parameter-free SiLU), as in the checkpoints.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d))

    def forward(self, x: Tensor, camera: Tensor) -> Tensor:
        """``x [N, L, D]`` tokens, ``camera [N, D]`` embedded cameras."""
        shift_a, scale_a, shift_m, scale_m = self.adaLN_modulation(camera)[:, None].chunk(4, dim=-1)
        x = x + self.attention(torch.addcmul(shift_a, self.layernorm_before(x), 1 + scale_a))
        h = torch.addcmul(shift_m, self.layernorm_after(x), 1 + scale_m)
        return x + self.output(F.gelu(self.intermediate(h)))


class _PatchProjection(nn.Module):
    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.projection = nn.Conv2d(3, config.encoder_dim, kernel_size=p, stride=p)


class PatchEmbedding(nn.Module):
    """Patchify, prepend the CLS token and add the (resampled) positional table."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.table_side = config.encoder_table_size // config.patch_size
        d = config.encoder_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.table_side**2, d))
        self.patch_embeddings = _PatchProjection(config)

    def positions(self, side: int) -> Tensor:
        """Positional table for ``side x side`` patches: ``[1, 1 + side^2, D]``.

        A different grid than the trained 14x14 resamples the patch part with
        bicubic interpolation at scale ``(side + 0.1) / 14`` (the DINO recipe:
        the 0.1 keeps the output size from rounding down); the CLS entry is kept.
        """
        table = self.position_embeddings
        g = self.table_side
        if side == g:
            return table
        grid = table[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        scale = (side + 0.1) / g
        grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (side, side):  # a float rounding surprise would silently misalign every token
            raise RuntimeError(f"positional table resampled to {tuple(grid.shape[-2:])}, expected {side}x{side}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, -1).to(table.dtype)
        return torch.cat([table[:, :1], grid], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """``images [N, 3, S, S]`` (normalised) -> tokens ``[N, 1 + (S/p)^2, D]``."""
        patches = self.patch_embeddings.projection(images)  # [N, D, S/p, S/p]
        side = patches.shape[-1]
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([cls, tokens], dim=1) + self.positions(side).to(tokens.dtype)


class _BlockStack(nn.Module):
    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(CameraModulatedBlock(config) for _ in range(config.encoder_layers))


class ViTBackbone(nn.Module):
    """Embedding, the modulated blocks, and the final norm (``ViTModel`` without pooler)."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.embeddings = PatchEmbedding(config)
        self.encoder = _BlockStack(config)
        self.layernorm = nn.LayerNorm(config.encoder_dim, eps=config.encoder_ln_eps)

    def forward(self, images: Tensor, camera: Tensor) -> Tensor:
        x = self.embeddings(images)
        for block in self.encoder.layer:
            x = block(x, camera)
        return self.layernorm(x)


class ImageEncoder(nn.Module):
    """Views + cameras -> image tokens for the triplane transformer."""

    def __init__(self, config: LRMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.encoder_dim
        self.model = ViTBackbone(config)
        self.camera_embedder = nn.Sequential(nn.Linear(config.camera_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, images: Tensor, cameras: Tensor) -> Tensor:
        """``images [B, V, 3, S, S]`` in ``[0, 1]``, ``cameras [B, V, 16]`` -> tokens ``[B, V * T, D]``."""
        b, v = images.shape[:2]
        flat = images.flatten(0, 1)
        # Constants made per call (not buffers): a model built on "meta" and loaded with assign=True has no
        # tensor left behind that the checkpoint does not provide.
        mean = torch.tensor(self.config.image_mean, device=flat.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=flat.device).view(1, 3, 1, 1)
        x = (flat.float() - mean) / std
        camera = self.camera_embedder(cameras.flatten(0, 1).to(self.camera_embedder[0].weight.dtype))
        tokens = self.model(x.to(self.model.embeddings.cls_token.dtype), camera)  # [B * V, T, D]
        return tokens.reshape(b, v * tokens.shape[1], tokens.shape[2])
