"""MiniCPM-o's audio step as a Core AI asset (`audio.aimodel`), for `python -m export.coreai`.

Function `main`: one 1 s chunk per call, the ONNX audio graph's inputs without the cache: mel [1, n_mels, 2C+3],
conv_mask [1, 2C+1], position_ids [C] (int32 at run time), attention_mask [1, 1, C, P+C] -> tokens [C / pool, H]
(C = 50 encoder frames, P = 1500 positions). The encoder cache is Core AI state, `k_cache_{i}` / `v_cache_{i}`
[1, heads, P, head_dim] in the model dtype (float32 by default: Core AI states, unlike Core ML's, may be float32),
written with `index_copy_` at slots position_ids[0] + [0, C) (export.stateful_audio). Float weights, or the
Whisper blocks' int4 records (`--quantize-audio`) already installed as BlockwiseLinear by export.coreai. Parity:
the asset through the Core AI runtime, its state carrying the cache over the three chunks of
`export.bundle.audio_example`, against the stateless `AudioChunkStep` (same weights) with its host float32 cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.bundle import audio_example, max_abs_error
from export.coreai_asset import AssetRunner, export_program, save_asset
from export.stateful_audio import AUDIO_INPUTS, StatefulAudioEncoder, audio_state
from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep

RESET = "fresh zeroed state arrays per backend reset; never needed for correctness (slots of earlier clips are masked)"


def asset_examples(examples: list[dict[str, torch.Tensor]], dtype) -> list[dict[str, np.ndarray]]:
    """The asset's inputs of each example: float inputs in the asset's dtype (the mask floored at its lowest
    finite value, as the host's AudioChunker does), integers as they are (AssetRunner passes them as int32)."""
    floor = np.finfo(dtype).min
    return [{n: (np.maximum(e[n].numpy(), floor).astype(dtype) if e[n].is_floating_point() else e[n].numpy())
             for n in AUDIO_INPUTS} for e in examples]


@torch.no_grad()
def export_audio(model: MiniCPMV, out: Path, dtype) -> tuple[Path, dict, float]:
    """audio.aimodel; its function's I/O and the max |token error| through the Core AI runtime against the
    stateless step (see the module docstring)."""
    step = AudioChunkStep(model).eval()
    examples = audio_example(model)
    expected = [step(**e)[0].float().numpy() for e in examples]
    wrapper = StatefulAudioEncoder(step, torch.float16 if dtype == np.float16 else torch.float32).eval()
    inputs = asset_examples(examples, dtype)
    program = export_program(wrapper, tuple(torch.from_numpy(inputs[0][n]) for n in AUDIO_INPUTS))
    wrapper.reset()  # tracing ran the module
    path = save_asset({"main": program}, out / "audio.aimodel", list(AUDIO_INPUTS), ["tokens"], wrapper.state_names)
    del program
    with AssetRunner(path) as runner:
        state = runner.new_state("main", dict.fromkeys(wrapper.state_names, wrapper.state_shape), dtype)
        got = [runner("main", e, state)["tokens"] for e in inputs]  # the state carries the cache chunk to chunk
        io = runner.describe("main")
    return path, io, max(max_abs_error(g, e) for g, e in zip(got, expected, strict=True))


def coreai_audio_state(model: MiniCPMV, dtype: str) -> dict:
    """`schedule.coreai.audio_state`: the audio function's states."""
    return audio_state(model, dtype, RESET)


def free_audio_weights(model: MiniCPMV) -> None:
    """Release the audio encoder's weights once its asset is written; on the meta device the modules keep the
    shapes the manifest's audio step and cache are read from."""
    model.apm.to("meta")
    model.audio_projection_layer.to("meta")
