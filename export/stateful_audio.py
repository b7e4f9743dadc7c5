"""MiniCPM-o's audio step with the encoder cache as converter state, for the Apple formats (Core AI, Core ML).

`StatefulAudioEncoder` is `AudioChunkStep` (minicpm.split) with the clip's encoder K/V in registered buffers the
converters turn into states: `k_cache_{i}` / `v_cache_{i}` per encoder layer, [1, heads, P, head_dim] (P = the
encoder's position table, 1500). Inputs are the ONNX audio graph's without the cache: mel [1, n_mels, 2C+3],
conv_mask [1, 2C+1], position_ids [C] int64, attention_mask [1, 1, C, P+C] (the host's additive mask: P cache
slots, then the C new frames) -> tokens [C / pool, H].

The chunk's K/V go to slots position_ids[0] + [0, C) (position_ids[0] = encoder frames of the piece already
cached; the host's 30 s pieces keep position_ids[0] + C <= P, so no slack), and the mask's C new-frame columns
move onto those slots, so the host builds exactly the mask it builds for ONNX. Stale slots of an earlier clip are
masked (exact zero weights): one state serves every clip.

The converters accept different writes at a traced position, so `write` picks the op (same values):
- "index_copy" (Core AI): `index_copy_` at slots position_ids[0] + arange(C), as export.coreai's LLM cache; a
  slice assignment at a traced position does not convert in coreai-torch.
- "slice" (Core ML): `slice_scatter` at `position_ids[0].item()` (read_state -> slice_update -> update_state);
  coremltools does not convert `index_copy_`.
`state_dtype`: Core AI states may be float32; Core ML's are float16 only.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep

AUDIO_INPUTS = ("mel", "conv_mask", "position_ids", "attention_mask")
WRITES = ("index_copy", "slice")


class StatefulAudioEncoder(nn.Module):
    """`AudioChunkStep` with the encoder cache in buffers that become states (see the module docstring).
    Run eagerly it is the exact PyTorch reference of the converted function (its buffers = the state arrays)."""

    def __init__(self, step: AudioChunkStep, state_dtype: torch.dtype = torch.float32, write: str = "index_copy"):
        super().__init__()
        if write not in WRITES:
            raise ValueError(f"write must be one of {WRITES}, got {write!r}")
        self.step, self.write = step.eval(), write
        self.layers, self.chunk = len(step.apm.layers), step.chunk
        self.positions = step.apm.embed_positions.weight.shape[0]
        self.state_shape = (1, step.heads, self.positions, step.head_dim)
        for name in self.state_names:  # one state per layer and tensor, as the LLM's
            self.register_buffer(name, torch.zeros(self.state_shape, dtype=state_dtype), persistent=False)

    @property
    def state_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in range(self.layers) for kind in ("k", "v")]

    def forward(self, mel: torch.Tensor, conv_mask: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        frames, slots = self.chunk, self.positions
        cached, new = attention_mask[..., :slots], attention_mask[..., slots:]
        if self.write == "index_copy":
            at = position_ids[:1] + torch.arange(frames)  # the chunk's slots

            def put(state: torch.Tensor, x: torch.Tensor) -> None:
                state.index_copy_(2, at, x.to(state.dtype))  # index_copy_ on a buffer: a Core AI state write

            mask = cached.index_copy(3, at, new)
        else:
            start = position_ids[0].item()  # encoder frames of the piece already in the cache
            torch._check(start >= 0)
            torch._check(start <= slots - frames)

            def put(state: torch.Tensor, x: torch.Tensor) -> None:
                state.copy_(torch.slice_scatter(state, x.to(state.dtype), dim=2, start=start, end=start + frames))

            mask = torch.slice_scatter(cached, new, dim=3, start=start, end=start + frames)

        def attend_over(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            put(keys, k)
            put(values, v)
            return keys.to(k.dtype), values.to(v.dtype)

        return self.step.run_layers(mel, conv_mask, position_ids, mask, attend_over)

    def reset(self) -> None:
        """Zero the cache (fresh state arrays; never needed for correctness: stale slots are masked)."""
        for name in self.state_names:
            getattr(self, name).zero_()


def audio_state(model: MiniCPMV, dtype: str, reset: str) -> dict:
    """The manifest's description of the audio function's states (as StatefulAudioEncoder registers them)."""
    step, layers = AudioChunkStep(model), len(model.apm.layers)
    positions = step.apm.embed_positions.weight.shape[0]
    return {"names": [f"{kind}_cache_{i}" for i in range(layers) for kind in ("k", "v")], "layers": layers,
            "shape": [1, step.heads, positions, step.head_dim], "dtype": dtype, "slots": positions,
            "write_position": "the chunk's C new K/V go to slots position_ids[0] + [0, C) (= encoder frames of the "
                              "piece already encoded); the graph moves the mask's C new columns there",
            "reset": reset}
