"""Calibration plumbing: call a model with a sample, catch what a block receives, replay a block.

The first block's inputs (positional and keyword arguments) are captured by a forward pre-hook that
stops the forward right there, so nothing past the first block runs. Later blocks reuse the same extra
arguments (attention mask, rotary tables, ...) with the previous block's output as hidden states, as in
Llama, Qwen, SigLIP, Whisper and BERT stacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from quant.layout import is_hybrid

CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers 5.x passes `cache=`


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def call(fn: Callable, item: Any) -> Any:
    """The calibration calling convention: dict -> fn(**d), tuple/list -> fn(*t), anything else -> fn(x)."""
    if isinstance(item, dict):
        return fn(**item)
    if isinstance(item, tuple | list):
        return fn(*item)
    return fn(item)


def is_vision_item(item: Any) -> bool:
    return isinstance(item, dict) and "pixel_values" in item


def is_audio_item(item: Any) -> bool:
    return isinstance(item, dict) and "audio_features" in item


def runner(model: nn.Module, block_path: str, items: list) -> tuple[Callable[[Any], Any], list]:
    """How to run the calibration items that reach the block list at `block_path`.

    MiniCPMV has no forward of its own: dicts with `pixel_values` are inputs of `model.vpm` and feed the
    vision blocks; dicts with `audio_features` ([1, n_mels, frames] log-mel) go through `model.encode_audio` (the
    recorded-clip path: 30 s pieces, the block-causal chunk mask) to the Whisper blocks; all other items are
    inputs of `model.llm` (e.g. {"inputs_embeds": ...}).
    """
    if is_hybrid(model):  # MiniCPM-V 4.6 / 4.7: items are inputs of the Qwen3.5 text model (quant.calibration)
        return (lambda item: call(model.model.language_model, item)), items
    if not isinstance(model, MiniCPMV):
        return (lambda item: call(model, item)), items
    if block_path.startswith("vpm."):
        chosen = [it for it in items if is_vision_item(it)]
        if not chosen:
            raise UserError("quantize_vision=True needs image calibration samples (dicts with pixel_values, "
                            "position_ids and patch_mask for model.vpm); see quant.calibration")
        return (lambda item: call(model.vpm, item)), chosen
    if block_path.startswith("apm."):
        chosen = [it for it in items if is_audio_item(it)]
        if not chosen:
            raise UserError("quantize_audio=True needs audio calibration samples (dicts with audio_features "
                            "[1, n_mels, frames] for model.encode_audio); see quant.calibration")
        return (lambda item: model.encode_audio(item["audio_features"])), chosen
    chosen = [it for it in items if not is_vision_item(it) and not is_audio_item(it)]
    if not chosen:
        raise UserError("no calibration samples for the language model (e.g. {'inputs_embeds': ...} dicts)")
    return (lambda item: call(model.llm, item)), chosen


def to_device(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None,
              memo: dict[int, tuple] | None = None) -> Any:
    """Move tensors inside nested tuples / lists / dicts; floating tensors optionally change dtype. `memo`
    (id -> (tensor, moved)) moves a tensor seen before only once (masks and rotary tables shared by many layers)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:  # the tensor is kept with its copy, so its id cannot be reused meanwhile
            dtype = float_dtype if float_dtype is not None and obj.is_floating_point() else obj.dtype
            memo[id(obj)] = (obj, obj.detach().to(device=device, dtype=dtype))
        return memo[id(obj)][1]
    if isinstance(obj, tuple | list):
        items = [to_device(o, device, float_dtype, memo) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples take fields
    if isinstance(obj, dict):
        return {k: to_device(v, device, float_dtype, memo) for k, v in obj.items()}
    return obj


@dataclass
class BlockInput:
    """What one calibration sample hands to a block: positional and keyword arguments."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        """The same call with new hidden states (the first positional argument, or `hidden_states=`)."""
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        if "hidden_states" in self.kwargs:
            return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden})
        raise UserError("cannot tell which argument of the blocks carries the hidden states (no positional "
                        "argument and no hidden_states=); set QuantConfig.blocks to a list of layers")


def _sanitize(kwargs: dict) -> dict:
    """No KV cache during calibration: replaying a block would append to it on every call (memory grows, and
    with a top-left causal mask every later replay attends to the first replay's keys and values)."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key in CACHE_KEYS or isinstance(value, Cache):
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(run: Callable[[Any], Any], items: list, block: nn.Module, block_name: str,
                   device: torch.device) -> list[BlockInput]:
    """Run each item until it reaches `block`; return the block's arguments per item (on `device`, float32)."""
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        captured.append(BlockInput(to_device(args, device, torch.float32),
                                   to_device(_sanitize(kwargs), device, torch.float32)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, item in enumerate(items):
            try:
                run(item)
            except _Stop:
                continue
            raise UserError(f"calibration sample {i} ran the model to the end without reaching {block_name or 'it'}"
                            " (do these inputs exercise the quantised layers?)")
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def capture_block_arguments(run: Callable[[Any], Any], items: list, blocks: list[nn.Module],
                            device: torch.device) -> list[list[BlockInput]]:
    """Each later block's own extra arguments per item ([block][item], hidden states left out as None), for block
    lists whose blocks take different ones (Qwen3.5: a recurrent mask for the linear-attention layers, a causal mask
    for the full-attention ones). One full-precision forward per item, stopped at the last block."""
    captured: list[list[BlockInput]] = [[] for _ in blocks[1:]]
    memo: dict[int, tuple] = {}  # one copy of each shared tensor for all blocks of an item

    def hook(index: int):
        def record(module, args, kwargs):
            kwargs = {**_sanitize(kwargs), **({"hidden_states": None} if "hidden_states" in kwargs else {})}
            captured[index].append(BlockInput(to_device((None, *args[1:]) if args else (), device, torch.float32, memo),
                                              to_device(kwargs, device, torch.float32, memo)))
            if index == len(captured) - 1:
                raise _Stop
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks[1:])]
    try:
        for item in items:
            memo.clear()
            try:
                run(item)
            except _Stop:
                continue
    finally:
        for h in handles:
            h.remove()
    return captured


def main_tensor(out: Any) -> torch.Tensor:
    """The hidden states in a block's output: a tensor, the first of a tuple, or a ModelOutput's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return main_tensor(next(iter(out.values())))
    raise UserError(f"a block returned {type(out).__name__}, expected a tensor or a tuple starting with one")


@torch.no_grad()
def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    return main_tensor(block(*inp.args, **inp.kwargs))


@torch.no_grad()
def output_mse(block: nn.Module, inputs: list[BlockInput], reference: list[torch.Tensor]) -> float:
    """Mean squared difference of the block's outputs from `reference`, over every sample and element."""
    total, count = 0.0, 0
    for inp, ref in zip(inputs, reference, strict=True):
        diff = run_block(block, inp).float() - ref
        total += float(diff.double().pow(2).sum())
        count += diff.numel()
    return total / max(count, 1)
