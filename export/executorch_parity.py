"""Parity of an ExecuTorch program: its methods through executorch.runtime against the torch modules they were
traced from (reference outputs computed before lowering, so the eager weights can be released first)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from export.bundle import audio_example, max_abs_error, video_example
from export.executorch_modules import (
    AUDIO_INPUTS,
    DECODER_INPUTS,
    PARITY_KEYS,
    VISION_INPUTS,
    as_tensor,
    decoder_inputs,
)
from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep, LanguageModelStep

if TYPE_CHECKING:
    from export.executorch import Method


def load_program(path: Path):
    from executorch.runtime import Runtime  # noqa: PLC0415

    return Runtime.get().load_program(path)


@dataclass
class Call:
    """One call of a parity check: the method's inputs and what its torch module returned for them, and for
    `audio_encoder` the K/V it must have written to its cache buffers (slots [start, start + frames))."""

    inputs: list[torch.Tensor]
    expected: torch.Tensor
    start: int = 0
    keys: torch.Tensor | None = None  # [layers, heads, frames, head_dim]
    values: torch.Tensor | None = None


@torch.no_grad()
def parity_references(methods: dict[str, Method], model: MiniCPMV, max_context: int, chunk: int
                      ) -> dict[str, list[Call]]:
    """The calls of each method's check (manifest parity key -> calls) with the torch modules' outputs: vision on
    a real slice, the decoder over a whole schedule (`decoder_reference`), the audio encoder over a clip
    (`audio_reference`). Computed before lowering, so the eager weights can go before the program is loaded."""
    references = vision_references(methods, model)
    if "audio_encoder" in methods:
        references["audio"] = audio_reference(model)
    references["text_decoder"] = decoder_reference(model, max_context, chunk)
    return references


@torch.no_grad()
def vision_references(methods: dict[str, Method], model: MiniCPMV) -> dict[str, list[Call]]:
    """The vision (and video) part of `parity_references`: with `--vision-weights int8` it is taken from the float
    modules before their weights are quantised, so the manifest's vision parity is against the float step."""
    vision = methods["vision_encoder"]
    references = {"vision_encoder": [Call(list(vision.example), vision.module(*vision.example))]}
    if "video_encoder" in methods:  # both example groups (4 and 2 of the 6 frame slots used), one per call
        video = methods["video_encoder"]
        groups = video_example(model, max_patches=video.example[3].shape[2])  # pos_embed [1, frames, P, H]
        inputs = [[groups[n][i:i + 1] for n in VISION_INPUTS] for i in range(len(groups["pixel_values"]))]
        references["video_encoder"] = [Call(x, video.module(*x)) for x in inputs]
    return references


def parity(path: Path, references: dict[str, list[Call]]) -> dict[str, float]:
    """Max |error| of each method of the program at `path` against its `parity_references`, each method's calls
    in order on one loaded method (the decoder's and the audio encoder's caches carry over between calls)."""
    program = load_program(path)
    methods = {v: k for k, v in PARITY_KEYS.items()}
    return {key: check_calls(program.load_method(methods.get(key, key)), calls) for key, calls in references.items()}


def check_calls(method, calls: list[Call]) -> float:
    """Max |error| of a loaded method's outputs over `calls`, and of the cache slots an audio call wrote."""
    error = 0.0
    for call in calls:
        error = max(error, max_abs_error(method.execute(call.inputs)[0], call.expected))
        if call.keys is None:
            continue
        start, frames = call.start, call.keys.shape[2]
        for i in range(len(call.keys)):
            keys = method._method.get_attribute(f"audio_k_cache_{i}")[:, :, start:start + frames].transpose(1, 2)
            values = method._method.get_attribute(f"audio_v_cache_{i}")[:, start:start + frames]
            error = max(error, max_abs_error(keys, call.keys[i]), max_abs_error(values, call.values[i]))
    return error


@torch.no_grad()
def decoder_reference(model: MiniCPMV, max_context: int, chunk: int, seed: int = 0) -> list[Call]:
    """A schedule through `LanguageModelStep` with a host-held cache (what the ONNX/torch backends do): a full
    prefill chunk, two decode steps, then a padded chunk at the end of the context whose pad rows land in the
    slack. A fresh stateful `text_decoder` given these calls in order must return the same logits."""
    step = LanguageModelStep(model, max_context).eval()
    shape = (len(step.layers), step.kv_heads, max_context, step.head_dim)
    keys, values = torch.zeros(shape), torch.zeros(shape)
    rng = np.random.RandomState(seed)
    hidden = model.config.hidden_size
    tail = max(1, chunk - 2)
    schedule = [(chunk, 0, chunk), (1, None, 1), (1, None, 1), (tail, max_context - tail, chunk)]
    past, calls = 0, []
    for n, start, width in schedule:
        past = past if start is None else start
        inputs = decoder_inputs(rng.randn(n, hidden).astype(np.float32), past, width, max_context)
        tensors = [as_tensor(inputs[k]) for k in DECODER_INPUTS]
        expected, new_keys, new_values = step(*tensors, keys, values)
        keys[:, :, past:past + n] = new_keys[:, :, :n]
        values[:, :, past:past + n] = new_values[:, :, :n]
        calls.append(Call(tensors, expected))
        past += n
    return calls


def decoder_parity(execute: Callable[[list], list], model: MiniCPMV, max_context: int, chunk: int,
                   seed: int = 0) -> float:
    """`decoder_reference`'s schedule through a fresh stateful `execute`: the max |logit difference|."""
    return max(max_abs_error(execute(call.inputs)[0], call.expected)
               for call in decoder_reference(model, max_context, chunk, seed))


@torch.no_grad()
def audio_reference(model: MiniCPMV) -> list[Call]:
    """The three chunks of `audio_example` in order through `AudioChunkStep` with the host-held cache: the tokens
    and the K/V a fresh `audio_encoder` must write to its buffers."""
    step = AudioChunkStep(model).eval()
    calls = []
    for chunk in audio_example(model):
        tokens, keys, values = step(**chunk)
        calls.append(Call([as_tensor(chunk[n].numpy()) for n in AUDIO_INPUTS], tokens,
                          int(chunk["position_ids"][0]), keys, values))
    return calls


def audio_parity(method, model: MiniCPMV) -> float:
    """`audio_reference`'s clip through a fresh loaded `audio_encoder`: max |error| of the tokens and of the K/V
    it wrote to its buffers."""
    return check_calls(method, audio_reference(model))
