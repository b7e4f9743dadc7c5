"""The vision graph of MiniCPM-V 4.6 / 4.7 (the NaViT ViT, its window-attention merger and the MLP merger) at a
fixed shape, for export: one image or slice per call, every index and mask computed on the host.

transformers' own path (`get_image_features`) packs slices of any size, splits attention by `cu_seqlens` with
`.tolist()` and builds the window permutation in Python from `target_sizes`: data-dependent, not exportable. Here
the patch row has a fixed length P = `max_patches` and the host supplies:

- pixel_values [1, 3, p, P*p] (model dtype): the slice's patch row exactly as the model's image processor lays it
  out (patches in raster order), zero-padded to P patches;
- position_ids [P] int64: the NaViT position of each patch (transformers' own `get_vision_nearest_position_ids`),
  0 for padding;
- patch_order [P] int64: a permutation of the row, applied once after the patch embedding. It puts the slice's
  h*w patches first, in nested block order (each window of the window-attention merger contiguous and in raster
  order inside it, windows grouped into the MLP merger's 2x2 blocks, blocks in raster order), then the padding.
  Every layer before a merge is per-token or full attention (permutation-equivariant), so after the permutation
  each merge is a plain reshape and the final tokens come out in the model's raster order;
- patch_mask [P] float (1 = patch, 0 = padding), in the permuted order, i.e. h*w ones then zeros. Padded patches
  are masked out of every full-attention layer as keys; window attention needs no mask (h and w are multiples of
  the window, so a window is all patch or all padding).

The step returns [P / m, H_text] features (m = 16 in "16x" mode, 4 in "4x"): rows 0 .. h*w/m - 1 are the slice's
tokens in the model's order, the rest are zeros. The host keeps the first `VisionLayout.tokens(h, w)` rows.

`max_patches_bound` chooses P from the image processor's slicing settings (see there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.vision_utils import get_vision_nearest_position_ids


@dataclass(frozen=True)
class VisionLayout:
    """What the host needs to lay out one slice for `HybridVisionStep`, read from the model config."""

    patch_size: int
    num_patches_per_side: int  # side of the learned position table (vision image_size / patch_size)
    window: int  # window-attention merger kernel (square); 1 when the window merger is skipped ("4x")
    merge: tuple[int, int]  # MLP merger kernel (h, w)
    merger_times: int

    @classmethod
    def from_config(cls, config, downsample_mode: str | None = None) -> VisionLayout:
        vision = config.vision_config
        mode = downsample_mode or config.downsample_mode
        if mode not in ("16x", "4x"):
            raise ValueError(f"downsample_mode {mode!r} is not '16x' or '4x'")
        window_h, window_w = vision.window_kernel_size
        if window_h != window_w:
            raise ValueError(f"window_kernel_size must be square, got {vision.window_kernel_size}")
        return cls(vision.patch_size, vision.image_size // vision.patch_size, window_h if mode == "16x" else 1,
                   tuple(config.merge_kernel_size), config.merger_times)

    @property
    def block(self) -> tuple[int, int]:
        """Patches per output token along (h, w): a slice's grid must be a multiple of it."""
        return (self.window * self.merge[0] ** self.merger_times, self.window * self.merge[1] ** self.merger_times)

    @property
    def patches_per_token(self) -> int:
        return self.block[0] * self.block[1]

    def tokens(self, h: int, w: int) -> int:
        """Valid output rows of a slice of h x w patches."""
        return (h // self.block[0]) * (w // self.block[1])

    def check(self, h: int, w: int, max_patches: int) -> None:
        if h % self.block[0] or w % self.block[1]:
            raise ValueError(f"a slice of {h}x{w} patches is not a multiple of the {self.block[0]}x{self.block[1]} "
                             "patches one token merges (the processor's downsample_mode must match the graph's)")
        if h * w > max_patches:
            raise ValueError(f"a slice has {h * w} patches ({h}x{w}), more than the {max_patches} the vision graph "
                             "takes (export with a larger max_patches, see max_patches_bound)")

    def patch_order(self, h: int, w: int) -> np.ndarray:
        """[h*w] int64: raster patch indices in nested block order (window raster innermost, then each merge
        round's block, outermost the final tokens in raster order)."""
        rounds = self.merger_times
        rows = [h // self.block[0], *[self.merge[0]] * rounds, self.window]  # outermost first
        cols = [w // self.block[1], *[self.merge[1]] * rounds, self.window]
        grid = np.arange(h * w, dtype=np.int64).reshape(*rows, *cols)
        depth = len(rows)
        return grid.transpose([a for i in range(depth) for a in (i, depth + i)]).reshape(-1)


def max_patches_bound(scale_resolution: int, patch_size: int, downsample_mode: str = "16x",
                      max_aspect: float = 20.0) -> int:
    """The largest patch count of any slice the model's image processor makes from an image whose aspect ratio
    (long side / short side) is at most `max_aspect`: the patch row length that makes every such slice fit.

    Every slice (the source image, sliced or not, and each refine cell) goes through the processor's
    `find_best_resize` with its rescaling branch taken (an unsliced image is upscaled, a sliced one has an area above
    `scale_resolution`^2, cells are upscaled): for aspect a = W/H, h' = int(s / sqrt(a)), w' = int(h' * a), then each
    side is rounded to a multiple of `patch_size * merge` (56 px in "16x", 28 in "4x", at least one). For a given h'
    the widest w' is reached at the top of a's interval, so scanning h' gives the exact maximum (an upper bound when
    the interval's end is excluded). The nominal (s / p)^2 = 1024 patches grows through the rounding: 1152 for aspect
    ratios up to 8, 1200 up to 20 (s = 448, p = 14, "16x"). No bound holds for every aspect ratio (a 1:1000 strip
    keeps growing), so the host refuses a slice above the exported bound (`VisionLayout.check`).
    """
    step = patch_size * (4 if downsample_mode == "16x" else 2)

    def ensure_divide(length: float) -> int:
        return max(round(length / step) * step, step)

    s = float(scale_resolution)
    best = 0
    for h in range(max(1, int(s / math.sqrt(max_aspect))), int(s * math.sqrt(max_aspect)) + 1):
        low, high = (s / (h + 1)) ** 2, (s / h) ** 2  # int(s / sqrt(a)) == h for a in (low, high]
        if low >= max_aspect or high < 1 / max_aspect:
            continue
        w = int(h * min(high, max_aspect))
        best = max(best, (ensure_divide(h) // patch_size) * (ensure_divide(w) // patch_size))
    return best


def split_slices(processor_output: Mapping) -> list[dict[str, torch.Tensor]]:
    """The image processor's packed output (pixel_values [1, 3, p, L*p], target_sizes [N, 2]) -> one dict per
    slice with the same keys (pixel_values [1, 3, p, h*w*p], target_sizes [1, 2]), in the processor's order."""
    pixels = torch.as_tensor(processor_output["pixel_values"])
    sizes = torch.as_tensor(processor_output["target_sizes"]).reshape(-1, 2)
    p = pixels.shape[2]
    out, start = [], 0
    for h, w in sizes.tolist():
        n = h * w
        out.append({"pixel_values": pixels[..., start * p : (start + n) * p],
                    "target_sizes": sizes.new_tensor([[h, w]])})
        start += n
    if start * p != pixels.shape[-1]:
        raise ValueError(f"target_sizes cover {start} patches but pixel_values holds {pixels.shape[-1] // p}")
    return out


def vision_inputs(one_slice: Mapping, max_patches: int, layout: VisionLayout) -> dict[str, np.ndarray]:
    """Fixed-shape inputs of `HybridVisionStep` for one slice as the model's image processor produced it
    ({"pixel_values": [1, 3, p, h*w*p], "target_sizes": [1, 2] or [2]}, numpy or torch; see `split_slices`).
    Returns numpy arrays: pixel_values [1, 3, p, P*p] float32, position_ids [P] int64, patch_order [P] int64,
    patch_mask [P] float32 (P = max_patches)."""
    pixels = np.asarray(one_slice["pixel_values"], dtype=np.float32)
    h, w = (int(v) for v in np.asarray(one_slice["target_sizes"]).reshape(-1)[:2])
    p = layout.patch_size
    n = h * w
    if pixels.shape != (1, 3, p, n * p):
        raise ValueError(f"pixel_values {list(pixels.shape)} is not one {h}x{w} slice [1, 3, {p}, {n * p}]")
    layout.check(h, w, max_patches)
    if max_patches % layout.patches_per_token:
        raise ValueError(f"max_patches {max_patches} must be a multiple of {layout.patches_per_token}")
    padded = np.zeros((1, 3, p, max_patches * p), np.float32)
    padded[..., : n * p] = pixels
    position_ids = np.zeros(max_patches, np.int64)
    position_ids[:n] = get_vision_nearest_position_ids(torch.tensor([[h, w]]), layout.num_patches_per_side).numpy()
    patch_order = np.arange(max_patches, dtype=np.int64)  # padding keeps its place after the slice's patches
    patch_order[:n] = layout.patch_order(h, w)
    patch_mask = np.zeros(max_patches, np.float32)
    patch_mask[:n] = 1.0
    return {"pixel_values": padded, "position_ids": position_ids, "patch_order": patch_order, "patch_mask": patch_mask}


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The ViT's bidirectional attention (transformers' eager path) on x [B, N, D], with an additive key bias
    broadcastable to [B, heads, N, N]."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    q, k, v = (proj(x).view(batch, tokens, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj,
                                                                                     attn.v_proj))
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
    return attn.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(batch, tokens, dim))


class HybridVisionStep(nn.Module):
    """One slice through MiniCPM-V 4.6 / 4.7's vision tower and merger at a fixed patch row (see the module doc).

    forward(pixel_values [1, 3, p, P*p], position_ids [P] int64, patch_order [P] int64, patch_mask [P])
    -> features [P / patches_per_token, H_text]; the first `layout.tokens(h, w)` rows are the slice's tokens.
    `downsample_mode` (default: the config's) must be the one the image processor sized the slices for.
    """

    def __init__(self, model: nn.Module, downsample_mode: str | None = None):
        super().__init__()
        inner = model.model
        config = inner.config
        tower = inner.vision_tower
        self.layout = VisionLayout.from_config(config, downsample_mode)
        self.embeddings = tower.embeddings
        self.layers = tower.encoder.layers
        self.post_layernorm = tower.post_layernorm
        self.mlps = inner.merger.mlp
        use_window = self.layout.window > 1
        self.insert_after = config.vision_config.insert_layer_id if use_window else -1
        if use_window:
            if not 0 <= self.insert_after < len(self.layers):
                raise ValueError(f"insert_layer_id {self.insert_after} is outside the {len(self.layers)} vision "
                                 "layers (the window merger would never run)")
            self.vit_merger = tower.vit_merger
        if len(self.mlps) != self.layout.merger_times:
            raise ValueError(f"the merger has {len(self.mlps)} MLPs for merger_times {self.layout.merger_times}")

    def vision_inputs(self, one_slice: Mapping, max_patches: int) -> dict[str, np.ndarray]:
        """`vision_inputs` with this step's layout."""
        return vision_inputs(one_slice, max_patches, self.layout)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, patch_order: torch.Tensor,
                patch_mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        dtype = emb.patch_embedding.weight.dtype
        x = emb.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [1, P, D], raster order
        x = x + emb.position_embedding(position_ids)[None]
        x = torch.index_select(x, 1, patch_order)
        valid = patch_mask.to(dtype)
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, valid)
            if i == self.insert_after:
                x = self._window_merge(x)
                valid = valid.reshape(-1, self.layout.window**2)[:, 0]  # a window is all patch or all padding
        x = self.post_layernorm(x)[0]
        dim, group = x.shape[-1], self.layout.merge[0] * self.layout.merge[1]
        for mlp in self.mlps:
            x = mlp(x.reshape(-1, group * dim))  # consecutive rows form one merge block (patch_order)
            valid = valid.reshape(-1, group)[:, 0]
            dim = x.shape[-1]
        return x * valid[:, None]  # padded rows are exact zeros

    def _layer(self, layer: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bias = torch.where(valid > 0.5, 0.0, torch.finfo(x.dtype).min).to(x.dtype)  # padded keys get no weight
        x = x + _attention(layer.self_attn, layer.layer_norm1(x), bias)
        return x + layer.mlp(layer.layer_norm2(x))

    def _window_merge(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' `MiniCPMV4_6ViTWindowAttentionMerger` on windows that are already contiguous: attention
        inside each window, then each window's tokens concatenated through the MLP plus their mean."""
        merger = self.vit_merger
        size = self.layout.window**2
        dim = x.shape[-1]
        windows = x.reshape(-1, size, dim)  # [P / size, size, D]
        windows = windows + _attention(merger.self_attn, merger.layer_norm1(windows), None)
        flat = windows.reshape(-1, size * dim)
        out = merger.linear_2(merger.act(merger.linear_1(merger.pre_norm(flat))))
        return (out + windows.mean(dim=1))[None]
