"""Groupwise integer codes: the one place that turns a float weight into (codes, scales, zeros) and back.

Convention shared by every record and every exporter (MatMulNBits, Core ML, ExecuTorch, AutoAWQ):

    w = (codes - zeros) * scales        codes, zeros: unsigned integers; scales: float16

* asymmetric int4: scale = (max - min) / 15, zero = clamp(round(-min / scale), 0, 15),
  codes = clamp(round(w / scale) + zero, 0, 15), with min <= 0 <= max (the range always covers 0).
* symmetric int4: scale = max|w| / 7, q = clamp(round(w / scale), -8, 7), stored as the unsigned code
  q + 8 with zero point 8. Dividing by 7 (not 8) keeps +max|w| representable; the code 0 (q = -8) is
  never produced here but is valid in imported records.
* int8 (lm_head / embeddings): symmetric per row, scale = max|w| / 127, codes = q + 128, zero 128.

Scales are rounded to float16 *before* the codes are computed, so the codes are the best ones for the
stored scale, and (codes - zeros) * scales evaluated in float32 is exact: the float16 mantissa (11 bits)
times an integer below 16 fits in float32's 24 bits. Every target can hold float16 scales exactly.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0
MIN_SCALE = 1e-6  # an all-zero group still gets a positive scale (its codes then equal the zero point)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales to float16 values (kept in float32 for the arithmetic)."""
    return scale.clamp(MIN_SCALE, FP16_MAX).half().float()


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (q, scale, zero) as float32 tensors: q [out, in], scale/zero [out, in/g].

    `clip` ([out, in/g], optional) is the max |w| allowed per group: weights are clamped to +-clip
    before the ranges are measured (AWQ's clip search).
    """
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    qmax = (1 << bits) - 1
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    if clip is not None:
        c = clip.float()[..., None]
        g = torch.maximum(torch.minimum(g, c), -c)
    if symmetric:
        half = 1 << (bits - 1)  # 8 for int4
        scale = _fp16(g.abs().amax(-1) / (half - 1))
        zero = torch.full_like(scale, float(half))
        q = torch.clamp(torch.round(g / scale[..., None]), -half, half - 1) + half
    else:
        # The range always includes 0, so a group of one sign is not clipped by the zero-point clamp
        # (identical to AutoAWQ's min/max whenever a group holds both signs, as weight groups do).
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = _fp16((hi - lo) / qmax)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
    return q.reshape(out_features, in_features), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes, scales, zeros) -> float32 weight [out, in]: (codes - zeros) * scales, groups along `in`."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    g = q.float().reshape(out_features, groups, in_features // groups)
    w = (g - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(out_features, in_features)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    """What the stored codes will dequantise to, as a float32 weight (used inside the searches)."""
    return dequantize_groups(*quantize_groups(w, bits, group_size, symmetric, clip))


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, cols] -> symmetric per-row int8 as (q, scale [rows, 1], zero [rows, 1]), codes q + 128."""
    w = w.float()
    scale = _fp16(w.abs().amax(-1, keepdim=True) / 127)
    q = torch.clamp(torch.round(w / scale), -127, 127) + 128
    return q, scale, torch.full_like(scale, 128.0)
