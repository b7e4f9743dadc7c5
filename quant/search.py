"""The AWQ searches inside one block: activation statistics, the alpha grid, the clip grid.

Where the error is measured: the alpha of every scale group is chosen on the *block output* (all
calibration samples, all tokens), with only that group fake-quantised and the rest of the block in full
precision. That is the most faithful target (it sees attention, the gated MLP and the residual) at
(alpha_grid + 1) block forwards per group; for groups in the block's last residual branch (the MLP, its down
projection) the branch alone gives the very same error, so only the branch runs. The clip search is local to
each Linear, per output group, on a token subsample of its own input, as in AutoAWQ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.capture import BlockInput, main_tensor, output_mse, run_block
from quant.codes import fake_quantize, quantize_groups
from quant.config import QuantConfig
from quant.layout import ScaleGroup
from quant.scaling import awq_scales, explicit_scale, weight_means

BRANCH_TOLERANCE = 1e-3  # relative gap allowed between the branch's and the block's RTN-trial MSE
MAX_SAMPLE_ROWS = 512  # input rows kept per group for the clip search and the per-layer error
CLIP_ROW_CHUNK = 256  # output rows per step of the clip search (bounds its memory)
# Errors in q/k are reshaped by the softmax, so a per-layer output MSE is a poor proxy: no clip search.
QK_NAMES = re.compile(r"(^|\.)(q_proj|k_proj|query|key|q|k|wq|wk|to_q|to_k)$")


@dataclass
class GroupStats:
    """Full-precision statistics of one group's input: mean |x| per channel and a row subsample."""

    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    # the group's residual branch (ScaleGroup.branch) per sample: its arguments and full-precision output
    branch_inputs: list[BlockInput] = field(default_factory=list)
    branch_reference: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


@torch.no_grad()
def shared_input_groups(block: nn.Module, inp: BlockInput, names: list[str]) -> list[ScaleGroup]:
    """Fallback layout: Linears that receive the very same input tensor form one explicit-scale group.
    Linears never called by the block's forward get no scale (kind "none")."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, args[0])  # the first call's input; returning None keeps the args as they are
        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    groups: list[ScaleGroup] = []
    for name in names:
        if name not in seen:
            groups.append(ScaleGroup([name], kind="none", reason="not called by the block's forward"))
            continue
        for group in groups:
            first = group.linears[0]
            if group.kind == "explicit" and seen.get(first) is seen[name]:
                group.linears.append(name)
                break
        else:
            groups.append(ScaleGroup([name]))
    return groups


@torch.no_grad()
def collect_stats(block: nn.Module, inputs: list[BlockInput], groups: list[ScaleGroup]
                  ) -> tuple[list[torch.Tensor], dict[int, GroupStats]]:
    """One full-precision pass: the block outputs per sample and each group's input statistics."""
    stats = {i: GroupStats() for i in range(len(groups))}  # unscaled groups still need inputs for clipping
    per_sample = max(1, math.ceil(MAX_SAMPLE_ROWS / len(inputs)))

    def hook(index):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            st = stats[index]
            st.abs_sum = x.abs().sum(0) if st.abs_sum is None else st.abs_sum + x.abs().sum(0)
            st.count += x.shape[0]
            step = max(1, x.shape[0] // per_sample)
            st.rows.append(x[::step][:per_sample].clone())
        return record

    def branch_hook(index):
        def record(module, args, kwargs, output):
            stats[index].branch_inputs.append(BlockInput(args, kwargs))
            stats[index].branch_reference.append(main_tensor(output).float())
        return record

    handles = [block.get_submodule(groups[i].linears[0]).register_forward_pre_hook(hook(i)) for i in stats]
    handles += [block.get_submodule(groups[i].branch).register_forward_hook(branch_hook(i), with_kwargs=True)
                for i in stats if groups[i].branch]
    try:
        outputs = [run_block(block, inp).float() for inp in inputs]
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        if len(st.branch_inputs) != len(inputs):  # called more or less than once per sample: not a plain branch
            st.branch_inputs, st.branch_reference = [], []
    return outputs, stats


def group_trial_scale(group: ScaleGroup, s: torch.Tensor) -> torch.Tensor:
    """The s the weights will really be multiplied by (explicit scales are rounded through float16)."""
    return explicit_scale(s)[1] if group.kind == "explicit" else s


@torch.no_grad()
def search_alpha(block: nn.Module, group: ScaleGroup, quantized: list[str], stats: GroupStats,
                 inputs: list[BlockInput], reference: list[torch.Tensor], config: QuantConfig
                 ) -> tuple[float | None, torch.Tensor | None, float, float, str]:
    """Pick the AWQ scale of one group by the block-output MSE of Q(W * s) (x / s).

    The identity (plain RTN, alpha None) competes with the grid, so the search never does worse than RTN
    on its own objective. Returns (alpha, s or None, best MSE, RTN MSE, what ran: "block" or the branch).
    For a group in the block's last residual branch the grid runs that branch alone: the same MSE at a
    fraction of the cost, once the RTN trial has shown the two agree.
    """
    linears = {n: block.get_submodule(n) for n in quantized}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    w_mean = weight_means(list(originals.values()), config.group_size)
    target, searched_on = (block, inputs, reference), "block"

    def trial(s: torch.Tensor | None) -> float:
        for n, m in linears.items():
            w = originals[n].float()
            if s is None:
                q = fake_quantize(w, config.bits, config.group_size, config.symmetric)
            else:
                q = fake_quantize(w * s[None, :], config.bits, config.group_size, config.symmetric) / s[None, :]
            m.weight.copy_(q.to(m.weight.dtype))
        try:
            return output_mse(*target)
        finally:
            for n, m in linears.items():
                m.weight.copy_(originals[n])

    best_alpha, best_s = None, None
    best = rtn = trial(None)
    if stats.branch_inputs:
        branch = block.get_submodule(group.branch)
        target, searched_on = (branch, stats.branch_inputs, stats.branch_reference), group.branch
        if not math.isclose(trial(None), rtn, rel_tol=BRANCH_TOLERANCE, abs_tol=1e-12):
            # something after the branch (a norm, a clamp): keep the block
            target, searched_on = (block, inputs, reference), "block"
    for i in range(config.alpha_grid):
        alpha = i / config.alpha_grid
        s = group_trial_scale(group, awq_scales(stats.mean, w_mean, alpha)).to(stats.mean.device)
        err = trial(s)
        if err < best:
            best, best_alpha, best_s = err, alpha, s
    return best_alpha, best_s, best, rtn, searched_on


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, float]:
    """Per (output row, input group): the max |w| (shrunk by a ratio from 1 down to min_clip_ratio) whose
    quantised weight minimises the MSE of that group's partial output x_g @ w_g.T on the sample rows.

    Returns (clip [out, in / g], mean chosen ratio).
    """
    g = config.group_size
    out_features, in_features = w.shape
    w = w.float()
    xg = x.float().reshape(x.shape[0], in_features // g, g)  # [n, G, g]
    ratios = [1 - (1 - config.min_clip_ratio) * i / config.clip_grid for i in range(config.clip_grid + 1)]
    clips, chosen = [], []
    for start in range(0, out_features, CLIP_ROW_CHUNK):
        wc = w[start:start + CLIP_ROW_CHUNK]
        wg = wc.reshape(wc.shape[0], -1, g)  # [o, G, g]
        org_max = wg.abs().amax(-1)  # [o, G]
        reference = torch.einsum("ogk,ngk->ogn", wg, xg)
        best_err = torch.full_like(org_max, float("inf"))
        best_clip = org_max.clone()
        best_ratio = torch.ones_like(org_max)
        for ratio in ratios:
            clip = org_max * ratio
            q = fake_quantize(wc, config.bits, g, config.symmetric, clip).reshape(wg.shape)
            err = (torch.einsum("ogk,ngk->ogn", q, xg) - reference).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip = torch.where(better, clip, best_clip)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        clips.append(best_clip)
        chosen.append(best_ratio)
    return torch.cat(clips), float(torch.cat(chosen).mean())


def needs_clip_search(name: str) -> bool:
    return QK_NAMES.search(name) is None


def quantize_weight(w: torch.Tensor, config: QuantConfig, clip: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 (codes uint8, scales float16, zeros uint8) of a weight, optionally clipped per group."""
    q, scale, zero = quantize_groups(w, config.bits, config.group_size, config.symmetric, clip)
    return q.to(torch.uint8), scale.half(), zero.to(torch.uint8)
