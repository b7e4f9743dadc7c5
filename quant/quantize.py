"""`awq_quantize` and `rtn_quantize`: turn a model's Linears into int4 records and a fake-quant model.

Both modify the model in place (pass a copy to keep the original) and return a `QuantResult` whose model
runs the quantised weights in PyTorch: every quantised Linear holds its dequantised weight, and layers
with an explicit AWQ input scale become `InputScaledLinear` (same parameter names).

AWQ, one block at a time (only one block's inputs and outputs are held):
  1. capture the first block's arguments for every calibration sample (the forward stops there);
  2. full-precision pass: block outputs, per-group input statistics;
  3. per scale group: alpha grid on the block-output MSE, fold the best s (norm, previous Linear, or an
     explicit input scale), then check that folding left the full-precision output unchanged;
  4. per Linear (not q/k): clip search; quantise; install the dequantised weight;
  5. run the quantised block to produce the next block's inputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minicpm.errors import UserError
from quant.capture import BlockInput, capture_block_arguments, capture_inputs, run_block, runner
from quant.config import QuantConfig
from quant.layout import Plan, ScaleGroup, known_layout, make_plan
from quant.records import QuantRecord
from quant.scaling import OFFSET_NORM, InputScaledLinear, apply_scale
from quant.search import (
    collect_stats,
    needs_clip_search,
    quantize_weight,
    search_alpha,
    search_clip,
    shared_input_groups,
)

FOLD_TOLERANCE = 1e-3  # relative change of a block's fp output that means a scale was folded wrongly


@dataclass
class Fold:
    """Scales folded around one quantised Linear, relative to the original model.

    col: the weight's input columns were multiplied by col (the layer now sees x / col).
    row: the weight's output rows were divided by row (the layer now produces y / row; v_proj, up_proj).
    """

    col: torch.Tensor | None = None
    row: torch.Tensor | None = None


@dataclass
class QuantResult:
    """The quantised model (fake-quant, runnable in PyTorch), its records, the config and a report.

    report: JSON-ready dict with "method", "seconds", "blocks", "layouts", "layers" (per int4 layer:
    scale placement, alpha, mean clip ratio, relative weight error and, for AWQ, the relative output error
    on calibration inputs; both in the original model's coordinates), "kept" (name -> why left in full
    precision) and "int8".
    folds: per quantised Linear, the AWQ scales folded around it (see `effective_weight`).
    """

    model: nn.Module
    records: dict[str, QuantRecord]
    config: QuantConfig
    report: dict
    folds: dict[str, Fold] = field(default_factory=dict)

    def effective_weight(self, name: str) -> torch.Tensor:
        """The quantised layer `name` as a weight acting on the original model's input of that layer:
        y = x @ W.T. Comparable with the full-precision weight for AWQ and RTN alike."""
        record = self.records[name]
        w = record.dequantize()
        if record.input_scale is not None:
            w = w * record.input_scale.float()[None, :]
        fold = self.folds.get(name, Fold())
        if fold.row is not None:
            w = w * fold.row.float().cpu()[:, None]
        if fold.col is not None and record.input_scale is None:  # an explicit scale already is 1 / col
            w = w / fold.col.float().cpu()[None, :]
        return w

    def summary(self) -> dict:
        """Counts and mean errors for tables."""
        layers = self.report.get("layers", {})
        weight = [v["weight_error"] for v in layers.values()]
        output = [v["output_error"] for v in layers.values() if v.get("output_error") is not None]
        return {
            "method": self.report.get("method"),
            "int4_layers": len(layers),
            "int8_layers": len(self.report.get("int8", [])),
            "kept_layers": len(self.report.get("kept", {})),
            "mean_weight_error": sum(weight) / len(weight) if weight else None,
            "mean_output_error": sum(output) / len(output) if output else None,
            "seconds": self.report.get("seconds"),
        }


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def _new_result(model: nn.Module, config: QuantConfig, plan: Plan, method: str) -> QuantResult:
    report = {"method": method, "config": config.to_dict(), "blocks": [bl.path for bl in plan.block_lists],
              "layouts": {}, "layers": {}, "kept": dict(plan.kept), "int8": sorted(plan.int8)}
    return QuantResult(model, {}, config, report)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@torch.no_grad()
def _install(module: nn.Linear, record: QuantRecord) -> None:
    """Put the dequantised weight into the model (exact (codes - zeros) * scales in float32 models)."""
    module.weight.copy_(record.dequantize(module.weight.dtype))


@torch.no_grad()
def _quantize_int8(result: QuantResult, plan: Plan) -> None:
    """Per-row symmetric int8 for lm_head / embeddings. Each gets its own Parameter, so a tied partner
    left in full precision keeps its weights."""
    for name, module in plan.int8.items():
        record = QuantRecord.int8_rows(module.weight)
        result.records[name] = record
        module.weight = nn.Parameter(record.dequantize(module.weight.dtype).to(module.weight.device),
                                     requires_grad=False)


def _materialize(calibration: Iterable) -> list:
    if isinstance(calibration, torch.Tensor | dict | str | bytes):
        raise UserError("calibration must be an iterable of samples (a list of dicts, tuples or tensors), "
                        f"not a single {type(calibration).__name__}")
    try:
        items = list(calibration)
    except TypeError:
        raise UserError(f"calibration must be an iterable of samples, got {type(calibration).__name__}") from None
    if not items:
        raise UserError("empty calibration: AWQ needs at least one sample to call the model with")
    return items


# ---------------------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def rtn_quantize(model: nn.Module, config: QuantConfig | None = None) -> QuantResult:
    """Round-to-nearest groupwise int4 of the Linears AWQ would quantise (no calibration, no clipping).

    The model is modified in place.
    """
    config = config or QuantConfig()
    start = time.perf_counter()
    plan = make_plan(model, config)
    result = _new_result(model, config, plan, "rtn")
    for name, module in plan.int4.items():
        original = module.weight.detach().float().cpu().clone()
        codes, scales, zeros = quantize_weight(module.weight, config)
        record = QuantRecord(codes.cpu(), scales.cpu(), zeros.cpu(), config.group_size, config.bits, config.symmetric)
        result.records[name] = record
        _install(module, record)
        result.report["layers"][name] = {"bits": config.bits, "scale": "none", "alpha": None, "clip": None,
                                         "weight_error": _relative(record.dequantize(), original),
                                         "output_error": None}
    _quantize_int8(result, plan)
    result.report["seconds"] = round(time.perf_counter() - start, 3)
    return result


# ---------------------------------------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def awq_quantize(model: nn.Module, calibration: Iterable[Any], config: QuantConfig | None = None) -> QuantResult:
    """Activation-aware int4 quantisation of any module with Linear layers (see the module docstring).

    calibration: samples to call the model with (dict -> model(**d), tuple -> model(*t), tensor -> model(t)).
    For a MiniCPMV, samples are inputs of `model.llm` (e.g. {"inputs_embeds": [1, L, H]}), plus dicts with
    `pixel_values` for `model.vpm` when quantize_vision=True; quant.calibration builds both.
    The model is modified in place.
    """
    config = config or QuantConfig()
    start = time.perf_counter()
    items = _materialize(calibration)
    plan = make_plan(model, config)
    device = config.resolve_device()
    model.eval()
    result = _new_result(model, config, plan, "awq")
    for block_list in plan.block_lists:
        run, chosen = runner(model, block_list.path, items)
        blocks = [block for _, block in block_list.blocks]
        inputs = capture_inputs(run, chosen, blocks[0], block_list.path, device)
        # Blocks of different layouts in one list (Qwen3.5's linear / full attention) may take different masks:
        # each then gets its own captured arguments; otherwise every block reuses the first one's.
        mixed = len({(known_layout(b) or ("generic",))[0] for b in blocks}) > 1
        own = capture_block_arguments(run, chosen, blocks, device) if mixed else None
        label = block_list.path or type(model).__name__
        progress = tqdm(block_list.blocks, desc=f"AWQ {label}", unit="block", disable=None)
        for index, (prefix, block) in enumerate(progress):
            last = index == len(block_list.blocks) - 1
            if own and index:
                inputs = [theirs.with_hidden(inp.hidden) for inp, theirs in zip(inputs, own[index - 1], strict=True)]
            inputs, layout = _awq_block(block, prefix, inputs, plan, result, device, last)
            result.report["layouts"].setdefault(block_list.path, set()).add(layout)
        del inputs
    result.report["layouts"] = {k: sorted(v) for k, v in result.report["layouts"].items()}
    _quantize_int8(result, plan)
    result.report["seconds"] = round(time.perf_counter() - start, 3)
    return result


class _OnDevice:
    """Hold a block on the calibration device in float32 while it is processed, then put it back."""

    def __init__(self, block: nn.Module, device: torch.device):
        first = next(block.parameters(), None)
        self.block, self.device = block, device
        self.home = (first.device, first.dtype) if first is not None else (device, torch.float32)

    def __enter__(self) -> nn.Module:
        return self.block.to(device=self.device, dtype=torch.float32)

    def __exit__(self, *exc) -> None:
        # a folded (1 + weight) norm stays float32 in any model dtype (quant.scaling.OFFSET_NORM)
        keep = {p: p.detach().float() for p in self.block.parameters() if getattr(p, OFFSET_NORM, False)}
        self.block.to(device=self.home[0], dtype=self.home[1])
        for p, value in keep.items():
            p.data = value.to(self.home[0])


def _awq_block(block: nn.Module, prefix: str, inputs: list[BlockInput], plan: Plan, result: QuantResult,
               device: torch.device, last: bool) -> tuple[list[BlockInput], str]:
    """Quantise one block; return the next block's inputs (none after the last) and the layout used."""
    with _OnDevice(block, device):
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        quantized = [n for n in names if f"{prefix}{n}".rstrip(".") in plan.int4]
        found = known_layout(block)
        if found:
            layout, groups = found
        else:
            layout, groups = "generic (explicit input scales)", shared_input_groups(block, inputs[0], names)
        if quantized:
            _search_and_quantize(block, prefix, inputs, groups, quantized, result)
        if last:
            return [], layout
        return [inp.with_hidden(run_block(block, inp).float()) for inp in inputs], layout


def _search_and_quantize(block: nn.Module, prefix: str, inputs: list[BlockInput], groups: list[ScaleGroup],
                         quantized: list[str], result: QuantResult) -> None:
    config = result.config

    def qualified(n: str) -> str:
        return f"{prefix}{n}".rstrip(".")

    originals = {n: block.get_submodule(n).weight.detach().float().cpu().clone() for n in quantized}
    reference, stats = collect_stats(block, inputs, groups)
    info: dict[str, dict] = {n: {"bits": config.bits, "scale": "none", "alpha": None, "clip": None}
                             for n in quantized}
    group_of: dict[str, int] = {}
    for index, group in enumerate(groups):
        members = [n for n in group.linears if n in info]
        group_of.update({n: index for n in members})
        if not members:
            continue
        if group.kind != "none" and stats[index].count == 0:
            group.kind, group.reason = "none", "its input never reached during calibration"
        if group.kind == "none":
            for n in members:
                info[n]["scale"] = group.describe()
            continue
        alpha, s, _, _, searched_on = search_alpha(block, group, members, stats[index], inputs, reference, config)
        for n in members:
            info[n]["searched_on"] = searched_on
        if s is None:
            for n in members:
                info[n]["scale"] = "not scaled (plain rounding scored best)"
            continue
        for n, s_used in apply_scale(block, group, s).items():
            result.folds.setdefault(qualified(n), Fold()).col = s_used.cpu()
        if group.kind == "linear":
            fold = result.folds.setdefault(qualified(group.prev), Fold())
            fold.row = s.cpu() if fold.row is None else fold.row * s.cpu()
        for n in members:
            info[n].update(scale=group.describe(), alpha=alpha)
    _check_fold(block, prefix, inputs[0], reference[0])

    for n in quantized:
        module = block.get_submodule(n)
        index = group_of.get(n)
        st = stats.get(index) if index is not None else None
        fold = result.folds.get(qualified(n), Fold())
        x = st.sample if st is not None and st.count else None  # original coordinates
        clip = None
        if config.clip_search and x is not None and needs_clip_search(n):
            x_seen = x / fold.col.to(x.device)[None, :] if fold.col is not None else x
            clip, info[n]["clip"] = search_clip(module.weight, x_seen, config)
        codes, scales, zeros = quantize_weight(module.weight, config, clip)
        input_scale = module.input_scale.half().cpu() if isinstance(module, InputScaledLinear) else None
        record = QuantRecord(codes.cpu(), scales.cpu(), zeros.cpu(), config.group_size, config.bits,
                             config.symmetric, input_scale)
        result.records[qualified(n)] = record
        _install(module, record)
        w_eff = result.effective_weight(qualified(n))
        info[n]["weight_error"] = _relative(w_eff, originals[n])
        info[n]["output_error"] = (_relative(x.cpu() @ w_eff.T, x.cpu() @ originals[n].T) if x is not None else None)
        result.report["layers"][qualified(n)] = info[n]


def _check_fold(block: nn.Module, prefix: str, inp: BlockInput, reference: torch.Tensor) -> None:
    """Folding must not change the full-precision block; if it did, the name mapping was wrong."""
    error = _relative(run_block(block, inp).float(), reference)
    if error > FOLD_TOLERANCE:
        where = prefix.rstrip(".") or type(block).__name__
        raise UserError(f"unsupported layout in {where} ({type(block).__name__}): folding AWQ scales changed its "
                        f"full-precision output by {error:.2e}; skip its Linears or set QuantConfig.blocks")
