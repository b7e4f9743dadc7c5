"""AWQ scales: the alpha formula, and folding 1/s into the op before a group (norm, Linear, or explicit).

Folding keeps the full-precision function unchanged: the group's weight columns are multiplied by s and
its input divided by s, so Q(W * s) (x / s) is the only change once the weights are quantised.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quant.layout import ScaleGroup

S_MIN, S_MAX = 1e-4, 1e4  # keep s (and 1/s, stored as float16) far from float16 limits
# A (1 + weight) norm that absorbed 1/s holds (1 + w) / s - 1, near -1 for a large s: in bfloat16 that loses the
# small difference, so such weights stay float32 whatever the model's dtype (the Parameter's `keep_float32`).
OFFSET_NORM = "keep_float32"


class InputScaledLinear(nn.Linear):
    """A Linear with a per-channel input multiplier: y = (x * input_scale) @ weight.T + bias.

    Same parameter names as nn.Linear (the multiplier is a non-persistent buffer), so the model's
    state_dict keys do not change. Used where no preceding op can absorb an AWQ scale.
    """

    input_scale: torch.Tensor

    @classmethod
    def convert(cls, linear: nn.Linear, input_scale: torch.Tensor) -> InputScaledLinear:
        """Turn `linear` into an InputScaledLinear in place (the object stays the same, so its parent,
        hooks and any other reference keep working, even when the Linear is the whole model)."""
        if isinstance(linear, InputScaledLinear):
            raise ValueError("this Linear already has an input scale (each Linear belongs to one scale group)")
        linear.__class__ = cls
        linear.register_buffer("input_scale", input_scale.to(linear.weight.device), persistent=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.input_scale.to(x.dtype), self.weight, self.bias)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha / (mean|w|^(1-alpha) + 1e-4), clamped, normalised by sqrt(max * min)."""
    s = (x_mean.float().pow(alpha) / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp(min=S_MIN)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(S_MIN, S_MAX)


def weight_means(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """mean |w| per input channel over all output rows, each group normalised by its own max |w|."""
    w = torch.cat([x.float() for x in weights])
    g = w.reshape(w.shape[0], -1, group_size).abs()
    g = g / g.amax(-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape).mean(0)


def explicit_scale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_scale as float16, the s it exactly inverts): the weights use 1/float16(1/s)."""
    input_scale = (1.0 / s).half()
    return input_scale, 1.0 / input_scale.float()


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide a norm's output by s through its weight (and bias); False (norm untouched) when the norm
    turns out to be neither `normalise(x) * weight + bias` nor `normalise(x) * (1 + weight)` (Gemma, Qwen3.5),
    checked on a random input. A folded (1 + weight) norm's weight is marked `OFFSET_NORM`."""
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    if weight is None or weight.ndim != 1 or weight.shape[0] != s.shape[0]:
        return False
    probe = torch.randn(4, s.shape[0], device=weight.device, dtype=weight.dtype)
    expected = norm(probe).float() / s.to(weight.device)
    old_w, old_b = weight.detach().clone(), bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    s = s.to(weight.device, torch.float32)
    for offset in (0.0, 1.0):  # weight' = (offset + weight) / s - offset
        weight.copy_(((old_w.float() + offset) / s - offset).to(weight.dtype))
        if old_b is not None:
            bias.copy_((old_b.float() / s).to(bias.dtype))
        got = norm(probe).float()
        if torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max())):
            if offset:
                setattr(weight, OFFSET_NORM, True)
            return True
    weight.copy_(old_w)  # neither form: leave it alone, the caller falls back to an explicit scale
    if old_b is not None:
        bias.copy_(old_b)
    return False


@torch.no_grad()
def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight.device, linear.weight.dtype)[None, :])


@torch.no_grad()
def divide_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.div_(s.to(linear.weight.device, linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.div_(s.to(linear.bias.device, linear.bias.dtype))


@torch.no_grad()
def apply_scale(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fold s into `block` for `group`: columns of the group's Linears times s, their input divided by s.

    Returns the s actually multiplied into each Linear's columns (explicit scales round 1/s to float16,
    so the weights use its exact inverse). A norm that cannot absorb s falls back to explicit scales,
    and `group.kind` is updated to say so.
    """
    kind = group.kind
    if kind == "norm" and not fold_into_norm(block.get_submodule(group.prev), s):
        kind = "explicit"
    if kind == "linear":
        divide_rows(block.get_submodule(group.prev), s)
    applied = {}
    for name in group.linears:
        linear = block.get_submodule(name)
        s_used = s
        if kind == "explicit":
            input_scale, s_used = explicit_scale(s)
            InputScaledLinear.convert(linear, input_scale)
        scale_columns(linear, s_used)
        applied[name] = s_used
    group.kind = kind
    return applied
