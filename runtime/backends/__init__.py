"""Backends run the two graphs of the split; everything else (the schedule) is host code in `session`.

A backend takes and returns numpy arrays named as in the manifest:
- `vision(pixel_values, position_ids, patch_mask, pos_embed) -> features`
- `video(...)`: the same inputs with a frame-slot axis after the first ([groups, frames, ...]) -> one feature
  block per group (MiniCPM-V 4.5 exports only: the manifest's `steps.video`)
- `llm(inputs_embeds, position_ids, attention_mask, last_index, past_keys, past_values)
   -> (logits, new_keys, new_values)`
- `audio(mel, conv_mask, position_ids, attention_mask, past_keys, past_values) -> (tokens, new_keys, new_values)`:
  one 1 s chunk with the encoder cache of the clip's earlier chunks (MiniCPM-o exports only: `steps.audio`,
  host side in runtime/audio_chunks.py); a backend keeping that cache as state sets `owns_audio_cache`.
A backend whose graph keeps the KV cache as state sets `owns_cache = True`: it gets the same inputs (with
empty past_keys / past_values), writes the new K/V itself, returns (logits, None, None) and has `reset()`.
"""

from __future__ import annotations

from pathlib import Path

from minicpm.errors import UserError
from runtime.backends.coreai_backend import CoreAIBackend
from runtime.backends.coreml_backend import CoreMLBackend
from runtime.backends.executorch_backend import ExecuTorchBackend, HybridExecuTorchBackend
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import HybridTorchBackend, TorchBackend

BACKENDS = ("torch", "onnxruntime", "coreml", "executorch", "coreai")  # each exporter issue adds its runtime here
# The runtime each export format runs on unless --backend says otherwise (torch runs any export's split).
DEFAULT_BACKENDS = {"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coreml", "coreai": "coreai"}


def default_backend(manifest: dict) -> str:
    """The backend of the export's own format (Core ML: macOS only; CoreMLBackend says so elsewhere)."""
    return DEFAULT_BACKENDS[manifest["format"]]


def reference_source(manifest: dict) -> str:
    """The checkpoint holding the export's exact weights, for the eager torch reference."""
    source = manifest["model"].get("source", "")
    quantized = manifest.get("quantization", {}).get("method", "none") != "none"
    if quantized and not (Path(source) / "quant_config.json").is_file():
        # The records were computed during the export: the checkpoint holds float weights only.
        raise UserError(f"this export is {manifest['quantization']['method']}, but its source {source} is a float "
                        "checkpoint: the torch reference would run other weights. Quantise with python -m quant.awq "
                        "and export that directory, or use the export's own backend")
    if not Path(source).is_dir():
        raise UserError(f"the export's source checkpoint {source or '(none)'} is missing (the torch reference runs it)")
    return source


def open_backend(name: str, directory: Path, manifest: dict, threads: int | None = None):
    """The backend `name` for an export directory whose manifest has been verified."""
    from runtime.manifest import artifact_path  # noqa: PLC0415

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "torch":
        if "state" in manifest["schedule"]:
            return HybridTorchBackend(reference_source(manifest), manifest["schedule"])
        return TorchBackend(reference_source(manifest), manifest["schedule"]["max_context"])
    if name == "executorch":
        if manifest["format"] != "executorch":
            raise UserError(f"backend executorch runs ExecuTorch exports; this directory holds a {manifest['format']} "
                            "export")
        schedule = manifest["schedule"]
        if "state" in schedule:  # MiniCPM-V 4.6 / 4.7: the per-layer state in the program's buffers
            return HybridExecuTorchBackend(artifact_path(directory, manifest, schedule["steps"]["prefill"]["artifact"]),
                                           manifest, threads)
        return ExecuTorchBackend(artifact_path(directory, manifest, schedule["steps"]["prefill"]["artifact"]),
                                 schedule["steps"], schedule["kv_cache"]["layers"], threads)
    if name == "coreml":
        return CoreMLBackend(directory, manifest)
    if name == "coreai":
        return CoreAIBackend(directory, manifest)
    if manifest["format"] != "onnx":
        raise UserError(f"backend {name} runs ONNX exports; this directory holds a {manifest['format']} export")
    steps = manifest["schedule"]["steps"]
    vision, video, audio = steps.get("vision"), steps.get("video"), steps.get("audio")
    return OnnxRuntimeBackend(artifact_path(directory, manifest, vision["artifact"]) if vision else None,
                              artifact_path(directory, manifest, steps["prefill"]["artifact"]),
                              threads, artifact_path(directory, manifest, video["artifact"]) if video else None,
                              artifact_path(directory, manifest, audio["artifact"]) if audio else None)
