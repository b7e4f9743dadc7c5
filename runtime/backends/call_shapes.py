"""What the backends share: fixed-width calls (padding a shorter call to a static function's width), native
runtimes' quirks (stderr, event loops, strides)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

# A hybrid export's step inputs besides its state (minicpm.hybrid_step; the state: the backend's, or named inputs)
STATE_STEP_INPUTS = ("inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens")


def pad_call(inputs: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """A call of T new tokens as one of `width` (a shorter prefill chunk on the fixed-width prefill function):
    pad rows see only the new rows up to themselves, and their K/V land in slots the mask never shows before
    real tokens overwrite them (slot == position, and the state has `width` slack slots past the context)."""
    x, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    tokens = x.shape[1]
    context = mask.shape[-1] - tokens
    embeds = np.zeros((1, width, x.shape[2]), dtype=x.dtype)
    embeds[:, :tokens] = x
    start = int(inputs["position_ids"][0, 0])
    positions = np.minimum(np.arange(start, start + width), context - 1).astype(np.int64)[None]
    low = np.finfo(mask.dtype).min
    padded = np.full((1, 1, width, context + width), low, dtype=mask.dtype)
    padded[..., :tokens, :context + tokens] = mask
    padded[..., tokens:, context:] = np.triu(np.full((width, width), low, dtype=mask.dtype), 1)[tokens:]
    return {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": padded,
            "last_index": inputs["last_index"]}


def pad_state_call(inputs: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """A hybrid step call of T tokens as one of `width` (a fixed-width prefill function): zero pad rows after the
    real ones, kept out of the linear state by `valid_tokens` (unchanged); their K/V land in slots past the real
    ones, masked until real tokens overwrite them (the state has `width` slack slots). Pad rows see the cached
    columns as row 0 does (the graph reads the cache length from row 0) and the new rows causally."""
    x, mask, positions = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    tokens = x.shape[1]
    context = mask.shape[-1] - tokens
    embeds = np.zeros((1, width, x.shape[2]), dtype=x.dtype)
    embeds[:, :tokens] = x
    low = np.finfo(mask.dtype).min
    padded = np.full((1, 1, width, context + width), low, dtype=mask.dtype)
    padded[..., :tokens, :context + tokens] = mask
    padded[..., tokens:, :context] = mask[..., :1, :context]
    padded[..., tokens:, context:] = np.triu(np.full((width, width), low, dtype=mask.dtype), 1)[tokens:]
    return {"inputs_embeds": embeds, "position_ids": np.pad(positions, ((0, 0), (0, width - tokens)), mode="edge"),
            "attention_mask": padded, "last_index": inputs["last_index"], "valid_tokens": inputs["valid_tokens"]}


def close_loop(loop, stack) -> None:
    if not loop.is_closed():
        with native_stderr_silenced():
            loop.run_until_complete(stack.aclose())
        loop.close()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a block: native libraries' log lines (the Core AI runtime logs every
    function it loads) that Python's sys.stderr cannot catch."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def strided_tensor(array: np.ndarray) -> torch.Tensor:
    """A copy with ordinary strides: numpy's `[None]` axes have stride 0, which ExecuTorch rejects."""
    return torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype).copy_(torch.from_numpy(array))
