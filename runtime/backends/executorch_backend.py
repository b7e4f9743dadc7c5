"""The ExecuTorch backends: the methods of an export's `model.pte`, the KV cache / per-layer state in the
program's mutable buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minicpm.errors import UserError
from runtime.backends.call_shapes import STATE_STEP_INPUTS, pad_state_call, strided_tensor


class ExecuTorchBackend:
    """The `.pte` program of `python -m export.executorch` through `executorch.runtime` (XNNPACK on CPU).

    Stateful: `text_decoder` keeps the KV cache in its mutable buffers `k_cache_{i}` / `v_cache_{i}`
    (`owns_cache`), and `audio_encoder` (MiniCPM-o) the clip's encoder cache in `audio_k_cache_{i}` /
    `audio_v_cache_{i}` (`owns_audio_cache`). The vision method takes one slice per call, so a batch runs slice
    by slice.
    """

    name = "executorch"
    owns_cache = True
    owns_audio_cache = True

    def __init__(self, path: Path, steps: dict, layers: int, threads: int | None = None):
        self.path, self.layers = path, layers
        self.functions = {step: spec.get("function", step) for step, spec in steps.items()}
        self.runtime = executorch_runtime(threads)
        self._load()

    def _load(self) -> None:
        try:
            self.program = self.runtime.load_program(self.path)
            self.vision_method = self.program.load_method(self.functions["vision"])
            self.video_method = self.program.load_method(self.functions["video"]) if "video" in self.functions \
                else None
            self.audio_method = self.program.load_method(self.functions["audio"]) if "audio" in self.functions \
                else None
            self.decoder = self.program.load_method(self.functions["prefill"])
        except Exception as e:  # noqa: BLE001 (an unloadable program is named, not dumped)
            raise UserError(f"executorch cannot load {self.path.name}: {str(e).splitlines()[0]} (programs lowered "
                            "to Core ML load on Apple platforms only)") from None
        # The cache buffers by name (the exporter emits the names): tensors aliasing the program's memory.
        try:
            self.cache = [self.decoder._method.get_attribute(f"{kind}_cache_{i}")
                          for i in range(self.layers) for kind in ("k", "v")]
        except Exception:  # noqa: BLE001 (a program without buffer names: reset() reloads instead)
            self.cache = None

    def reset(self) -> None:
        """Empty conversation: zero the cache buffers in place (or, without their names, reload the program:
        a fresh load has zeroed buffers). Correctness only needs finite values, as masked slots contribute
        exact zeros; zeroing makes a reset conversation identical to one on a freshly loaded program."""
        if self.cache is None:
            self._load()
            return
        for buffer in self.cache:
            buffer.zero_()

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        batch = len(inputs[names[0]])
        out = [self.vision_method.execute([strided_tensor(inputs[n][i:i + 1]) for n in names])[0] for i in range(batch)]
        return torch.cat(out).numpy()

    def video(self, **inputs: np.ndarray) -> np.ndarray:
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        groups = len(inputs[names[0]])  # one frame group per call
        return torch.cat([self.video_method.execute([strided_tensor(inputs[n][i:i + 1]) for n in names])[0]
                          for i in range(groups)]).numpy()

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        names = ("inputs_embeds", "position_ids", "attention_mask", "last_index")  # past K/V: in the program
        logits = self.decoder.execute([strided_tensor(inputs[n]) for n in names])[0]
        return logits.numpy(), None, None

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        if self.audio_method is None:
            raise UserError("this ExecuTorch export has no audio_encoder method (audio needs a MiniCPM-o export)")
        names = ("mel", "conv_mask", "position_ids", "attention_mask")  # past K/V: in the program
        tokens = self.audio_method.execute([strided_tensor(inputs[n]) for n in names])[0]
        return tokens.numpy(), None, None


class HybridExecuTorchBackend:
    """A MiniCPM-V 4.6 / 4.7 `.pte` of `python -m export.executorch` (export/executorch_hybrid.py) through
    `executorch.runtime`: the step methods (`prefill` at T = the export's chunk, `text_decoder` at T = 1) share the
    per-layer state in the program's mutable buffers, so the backend `owns_state` (the session sends no state and
    gets the logits only); a call of fewer tokens runs the next wider method padded (valid_tokens = the real rows).
    `reset()` zeroes the buffers in place by their names (`schedule.executorch.state`). `vision_encoder` takes one
    slice's fixed-shape inputs (`steps.vision.inputs`)."""

    name = "executorch"
    owns_state = True

    def __init__(self, path: Path, manifest: dict, threads: int | None = None):
        runtime = executorch_runtime(threads)
        schedule = manifest["schedule"]
        steps, state = schedule["steps"], schedule["executorch"]["state"]
        vision = steps.get("vision")  # a text-only export has none (the session refuses images first)
        try:
            program = runtime.load_program(path)
            self.methods = {steps[s]["tokens"]: program.load_method(steps[s]["function"])
                            for s in ("prefill", "decode")}
            self.vision_method = program.load_method(vision["function"]) if vision else None
            # tensors aliasing the program's buffer memory, shared by both step methods (share_mutable_buffers)
            self.buffers = [self.methods[1]._method.get_attribute(name) for name in state["tensors"]]
        except Exception as e:  # noqa: BLE001 (an unloadable program is named, not dumped)
            raise UserError(f"executorch cannot load {path.name}: {str(e).splitlines()[0]}") from None
        self.vision_inputs = vision["inputs"] if vision else []
        self.reset()

    def reset(self) -> None:
        """Zeroed KV, conv and recurrent buffers: a new conversation."""
        for buffer in self.buffers:
            buffer.zero_()

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_method.execute([strided_tensor(inputs[n]) for n in self.vision_inputs])[0].numpy()

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray]:
        tokens = inputs["inputs_embeds"].shape[1]
        width = min((t for t in self.methods if t >= tokens), default=None)
        if width is None:
            raise UserError(f"the ExecuTorch program takes at most {max(self.methods)} tokens per call, got {tokens}")
        feed = inputs if width == tokens else pad_state_call(inputs, width)
        return (self.methods[width].execute([strided_tensor(feed[n]) for n in STATE_STEP_INPUTS])[0].numpy(),)


def executorch_runtime(threads: int | None):
    """executorch's runtime with XNNPACK, its thread pool sized to `threads` (default: one thread per core)."""
    from executorch.runtime import Runtime  # noqa: PLC0415

    runtime = Runtime.get()
    if threads:
        from executorch.extension.pybindings import portable_lib  # noqa: PLC0415

        portable_lib._unsafe_reset_threadpool(threads)
    if not runtime.backend_registry.is_available("XnnpackBackend"):
        raise UserError("this executorch build has no XnnpackBackend")
    return runtime
