"""Where `export.executorch` gets its model: as little resident memory as a multi-method lowering allows.

    model = resident_model(ckpt, args)   # .model, .quant, .facts (install_records'), .table() for token_embedding.bin

ExecuTorch lowers every method of a program in one `to_edge_transform_and_lower` call, so, unlike export.onnx
(one part at a time, export/onnx_weights.py), every method's weights are resident together. They are made small:
- `--quant int4-rtn` or `none` on a checkpoint: the model starts on the meta device (minicpm.lazy_model); each
  planned Linear is read in its stored dtype, quantised alone (`StreamedWeights.quantize`, rtn_quantize's codes
  from the same float32 values) and installed at once as the torchao weight the program is traced from
  (`install_records`: int8 codes, 1 byte per weight instead of float32's 4); the rest (vision, audio, norms, a
  float head) is read as float32. No float32 copy of the LLM is ever held.
- the token embedding table is not read into the model: no method of the program uses it (the host reads
  `token_embedding.bin`, written from the checkpoint block by block), unless a tied float head needs it.
- AWQ (it calibrates on the whole float model) and quantised checkpoint directories: the whole float32 model
  (`prepare_model`), as before.
Codes and scales are the same either way, so the programs are too.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from export.executorch import install_records, prepare_model
from export.onnx_weights import StreamedWeights
from export.quantization import Quantization
from minicpm.checkpoint import Checkpoint
from minicpm.lazy_model import return_freed_memory
from minicpm.modeling import MiniCPMV
from minicpm.split import token_embedding_table


@dataclass
class ResidentModel:
    model: MiniCPMV  # what the methods are traced from (its embedding table may be left on the meta device)
    quant: Quantization
    facts: dict  # install_records' manifest facts ({} without records)
    table: Callable[[], torch.Tensor]  # the token embedding table, for token_embedding.bin


def resident_model(ckpt: Checkpoint, args: argparse.Namespace) -> ResidentModel:
    """The model for `args` (export.executorch's arguments): streamed where nothing needs the whole float model."""
    directory = (ckpt.path / "quant_config.json").is_file()
    if directory or args.quant == "int4-awq":
        model, quant, facts = prepare_model(ckpt, args.quant, args.group_size, args.backend, args.lm_head,
                                            args.samples, args.calib, args.quantize_audio or None)
        return ResidentModel(model, quant, facts, lambda: token_embedding_table(model))
    return _streamed(ckpt, args)


def _streamed(ckpt: Checkpoint, args: argparse.Namespace) -> ResidentModel:
    # XNNPACK's int4 has no zero points: symmetric records, as prepare_model asks quantized_model for
    weights = StreamedWeights(ckpt, argparse.Namespace(**{**vars(args), "symmetric": True, "accuracy_level": 0}),
                              torch.float32, audio_level=0)
    xnnpack, facts = args.backend == "xnnpack", {}

    def install(name: str, record) -> None:
        nonlocal facts
        installed = install_records(weights.model, {name: record}, activations_int8=xnnpack, bf16_scales=xnnpack)
        rounding = max(facts.get("max_scale_rounding", 0.0), installed["max_scale_rounding"])
        facts = {**installed, "max_scale_rounding": rounding}

    weights.load_whole(install)  # each record's uint8 codes go with it: the installed weight holds its int8 copy
    weights.model.eval().requires_grad_(False)
    collect()
    return ResidentModel(weights.model, weights.quant, facts, weights.embedding_table)


VISION_INT8 = {"weights": "int8 per output channel (symmetric)", "activations": "int8 per token, dynamic (8da8w)",
               "op": "XNNPACK dynamically quantised fully connected", "parity": "against the float torch step"}


def install_int8_vision(*modules: torch.nn.Module) -> int:
    """`--vision-weights int8`: every float Linear of the vision methods' modules gets a symmetric per-output-channel
    int8 record (QuantRecord.int8_rows, as the int8 head's) installed as the head's is: XNNPACK runs it
    with int8 dynamic per-token activations, ~2x the float32 speed on CPUs with int8 dot products and a quarter of
    the bytes. A Linear two modules share is installed once. Returns the number of Linears installed."""
    from quant.records import QuantRecord  # noqa: PLC0415

    count = 0
    for module in modules:
        for name, linear in list(module.named_modules()):
            if not isinstance(linear, torch.nn.Linear) or type(linear.weight.data) is not torch.Tensor:
                continue  # not a Linear, or installed already (a torchao tensor)
            record = QuantRecord.int8_rows(linear.weight.detach())
            install_records(module, {name: record}, activations_int8=True, bf16_scales=True)
            count += 1
    return count


def collect() -> None:
    """Free what the exporters no longer reference: their graphs hold reference cycles, and glibc keeps freed
    pages unless asked to return them."""
    gc.collect()
    return_freed_memory()


def release_weights(*modules: torch.nn.Module) -> None:
    """Put every parameter and buffer of `modules` on the meta device (shape and dtype kept, for the manifest):
    once traced, the exported programs hold the only references the lowering needs, and dropping those frees
    the weights."""
    for module in modules:
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for name, value in store.items():
                    if value is not None and value.device.type != "meta":
                        meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
                        store[name] = torch.nn.Parameter(meta, requires_grad=False) \
                            if isinstance(value, torch.nn.Parameter) else meta
    collect()
