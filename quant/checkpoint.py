"""A quantised checkpoint directory: written atomically, loadable as a model and as records.

Layout (everything a MiniCPM checkpoint has, plus two files):
    config.json, tokenizer files, generation/preprocessor configs   copied from the source checkpoint
    model.safetensors          the full-precision tensors *after* AWQ folding (norm weights absorb scales),
                               with every quantised weight replaced by its dequantised value (times its
                               input scale), so `minicpm.load_model(dir)` runs the quantised model as is
    quant_records.safetensors  the int4 / int8 records (codes, scales, zeros, input scales): what exporters
                               write as MatMulNBits / constexpr / packed weights
    quant_config.json          method, QuantConfig, per-layer report and summary
The o-models' audio encoder (`apm.*`, `audio_projection_layer.*`) is carried over (with its int4 records when
quantised with quantize_audio); their speech-output weights (`tts.*`, not built by this project) are not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from export.bundle import staged_directory
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from quant.quantize import QuantResult
from quant.records import default_mode, load_records, save_records
from quant.scaling import InputScaledLinear

RECORDS_FILE = "quant_records.safetensors"
CONFIG_FILE = "quant_config.json"
FORMAT = "minicpm-mobile-quant"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless `overwrite` (checked before any heavy work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    return out


def open_checkpoint(name: str | os.PathLike):
    """The source checkpoint: `minicpm.v4_6.HybridCheckpoint` for MiniCPM-V 4.6 / 4.7, else `Checkpoint`."""
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415
    from minicpm.checkpoint import Checkpoint  # noqa: PLC0415
    from minicpm.v4_6 import HybridCheckpoint  # noqa: PLC0415

    return HybridCheckpoint.open(name) if is_hybrid_model(name) else Checkpoint.open(name)


def _tied_head(model: nn.Module) -> str | None:
    """The lm_head weight's name when it is the embedding table (left out of the file, as the source does)."""
    if isinstance(model, MiniCPMV):
        return "llm.lm_head.weight" if model.config.llm.tie_word_embeddings else None
    return "lm_head.weight" if getattr(model.config, "tie_word_embeddings", False) else None  # MiniCPM-V 4.6 / 4.7


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.detach().contiguous()
    for name, module in model.named_modules():
        if isinstance(module, InputScaledLinear):  # a plain Linear must compute the same function
            w = module.weight.float() * module.input_scale.float()[None, :]
            state[f"{name}.weight"] = w.to(module.weight.dtype).contiguous()
    tied = _tied_head(model)
    if tied:
        state.pop(tied, None)
    return state


def write_quantized(result: QuantResult, source: str | os.PathLike, out: str | os.PathLike,
                    info: dict | None = None, overwrite: bool = False) -> Path:
    """Write the quantised checkpoint directory `out` (see the module docstring); atomic: a temporary
    directory next to `out` is filled, then renamed into place."""
    source, out = Path(source), check_out_dir(out, overwrite)
    with staged_directory(out) as tmp:  # the exporters' staging: killed runs leave the old directory or none
        os.chmod(tmp, default_mode(directory=True))
        for f in sorted(source.iterdir()):
            if f.is_file() and not f.name.endswith(WEIGHT_FILES):
                shutil.copy2(f, tmp / f.name)
        save_file(_state_dict(result.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", default_mode())
        save_records(tmp / RECORDS_FILE, result.records, result.config)
        meta = {"format": FORMAT, "version": 1, "method": result.report.get("method"), "records": RECORDS_FILE,
                "quant_config": result.config.to_dict(), "summary": result.summary(), **(info or {}),
                "report": result.report}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out


def load_quantized(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto") -> QuantResult:
    """Load a quantised checkpoint directory: the model with its quantised layers installed (explicit input
    scales as InputScaledLinear) and the records, bit-exact as written."""
    path = Path(path)
    meta_file = path / CONFIG_FILE
    if not meta_file.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE} (not a quantised checkpoint; see python -m quant.awq)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_file}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_file}: not a {FORMAT} file")
    records, config = load_records(path / meta.get("records", RECORDS_FILE))
    model, _ = open_checkpoint(path).load_model(dtype)
    with torch.no_grad():
        for name, record in records.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UserError(f"{path}: record {name} names no module of the model") from None
            if tuple(module.weight.shape) != record.shape:
                raise UserError(f"{path}: record {name} is {list(record.shape)}, the model's weight is "
                                f"{list(module.weight.shape)}")
            if record.input_scale is not None:
                InputScaledLinear.convert(module, record.input_scale.float())
            module.weight.copy_(record.dequantize(module.weight.dtype))
    return QuantResult(model, records, config, meta.get("report", {}))
