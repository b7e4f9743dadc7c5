"""Perceiver resampler: patch features of one image or slice -> `query_num` vectors of the LLM width.

2D (V-4.0, V-2.6, o-2.6, o-4.5): learned queries attend to the patch features with a 2D sin-cos
position added to the keys. 3D (V-4.5) adds a 1D sin-cos temporal embedding per video frame.
The position tables are host data (numpy float32, computed as upstream); the forward takes them in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[..] positions -> [.., dim] float32: sin half then cos half, w_i = 1 / 10000^(i / (dim/2)). Upstream's
    float32 formula evaluated in float64 and rounded once: numpy's float32 pow / sin / cos differ by an ulp
    between CPUs (SIMD dispatch), which at positions near 2000 moves a value by 2e-4; rounded double results are
    what any platform (MiniCPMKit's PositionTables) reproduces."""
    omega = (1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))).astype(np.float32)
    out = np.einsum("...,d->...d", np.asarray(pos, dtype=np.float32).astype(np.float64), omega.astype(np.float64))
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1).astype(np.float32)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols, dim] table; the first half encodes the column, the second half the row."""
    grid_w, grid_h = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=-1)


_TABLES: dict[int, np.ndarray] = {}


def pos_embed_2d(dim: int, tgt_h: int, tgt_w: int) -> np.ndarray:
    """[h*w, dim] position table of one slice: the [:h, :w] corner of a 70 x 70 table grown on demand
    (host data: the runtime computes it exactly as the resampler does)."""
    table = _TABLES.get(dim)
    if table is None or tgt_h > table.shape[0] or tgt_w > table.shape[1]:
        rows, cols = (70, 70) if table is None else table.shape[:2]
        table = _TABLES[dim] = sincos_2d(dim, max(tgt_h, rows), max(tgt_w, cols))
    return np.ascontiguousarray(table[:tgt_h, :tgt_w].reshape(tgt_h * tgt_w, -1))


def temporal_embed(dim: int, temporal_id: int) -> np.ndarray:
    """[dim] 1D sin-cos of a frame's temporal id (0.1 s units): added to the frame's keys (host data)."""
    return sincos_1d(dim, np.asarray([temporal_id], dtype=np.float32))[0]


class Resampler(nn.Module):
    """Parameter names follow upstream `resampler.*`; `pos_embed` is not stored in checkpoints."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, num_heads: int | None = None,
                 temporal: bool = False):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads or embed_dim // 128
        self.temporal = temporal
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, self.num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

    def pos_embed(self, tgt_h: int, tgt_w: int) -> torch.Tensor:
        """[h*w, D] position table of one slice (see `pos_embed_2d`)."""
        return torch.from_numpy(pos_embed_2d(self.embed_dim, tgt_h, tgt_w))

    def temporal_embed(self, temporal_id: int) -> torch.Tensor:
        return torch.from_numpy(temporal_embed(self.embed_dim, temporal_id))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                frames: int = 1) -> torch.Tensor:
        """x [B, L, Dv] patch features, pos [B, L, D] key positions (2D, plus temporal for video frames),
        mask [B, L] True = padding. With `frames` > 1, each run of `frames` consecutive inputs is one video
        group: their keys and values are concatenated and resampled into one output."""
        x = self.ln_kv(self.kv_proj(x))
        if frames > 1:
            b, length = x.shape[:2]
            x = x.reshape(b // frames, frames * length, -1)
            pos = pos.reshape(b // frames, frames * length, -1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.reshape(b // frames, frames * length)
        x = x.transpose(0, 1)  # L, B, D
        q = self.ln_q(self.query)[:, None, :].expand(-1, x.shape[1], -1)  # Q, B, D
        out = self.attn(q, x + pos.transpose(0, 1).to(x.dtype), x, key_padding_mask=key_padding_mask,
                        need_weights=False)[0]
        return self.ln_post(out.transpose(0, 1)) @ self.proj
