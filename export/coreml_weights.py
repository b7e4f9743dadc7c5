"""Core ML's int4 / int8 weights as the records' own codes, and the streamed load that makes a full-size export fit.

    weights = open_weights(ckpt, args)   # .model, .quant, .records (installed as BlockwiseLinear modules)
    with weights.part(VISION):
        ...                               # convert the vision package: only the vision weights are resident

A recorded Linear becomes a `BlockwiseLinear`: it holds the record's uint8 codes, float16 scales and uint8 zero
points (1 byte per weight, not a float32 copy) and computes its weight with the `minicpm_coreml::blockwise_dequantize`
op, (codes - zeros) * scales exactly as `QuantRecord.dequantize`. torch.export keeps that op as one node, and the
converter registered here writes it as `constexpr_blockwise_shift_scale(data=codes, scale, offset=zeros)` (uint4,
or uint8 for an int8 head): the codes go to the package as they are, never re-derived from a float weight.
coremltools' own torchao path (`dequantize_affine`) takes signed int4 only, so our unsigned codes and zero points
would be rewritten; this op keeps them bit for bit.

`--quant int4-rtn` or `none` on a checkpoint streams it (export.onnx_weights.StreamedWeights.part: one part at a
time, each Linear read in its stored dtype, quantised alone and installed, the part released when its package is
written, the token embedding table left in the checkpoint for token_embedding.bin), so no float copy of the LLM is
ever held and the vision and LLM weights are never resident together. AWQ (it calibrates on the whole float model) and
quantised directories load the whole float32 model and install the same way.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export.onnx_weights import StreamedWeights
from export.quantization import Quantization, quantized_model
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.split import token_embedding_table
from quant.records import QuantRecord


@torch.library.custom_op("minicpm_coreml::blockwise_dequantize", mutates_args=())
def blockwise_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         half: bool) -> torch.Tensor:
    """(codes - zeros) * scales as a float32 [out, in] weight, groups of in / scales.shape[1] along `in`. `bits`
    (4 or 8) and `half` (float16 scales in the package, for fp16 programs) are read by the converter only."""
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    grouped = codes.float().reshape(out_features, groups, in_features // groups)
    return ((grouped - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_features, in_features)


@blockwise_dequantize.register_fake
def _(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, half: bool) -> torch.Tensor:
    return codes.new_empty(codes.shape, dtype=torch.float32)


class BlockwiseLinear(nn.Module):
    """A Linear whose weight is its record's codes, dequantised by `blockwise_dequantize` (see the module
    docstring). An AWQ input scale no norm could absorb (InputScaledLinear) is kept and applied first."""

    def __init__(self, linear: nn.Linear, record: QuantRecord, half: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", record.codes)
        self.register_buffer("scales", record.scales.half())  # float16 values, exact in float32
        self.register_buffer("zeros", record.zeros)
        self.bits, self.half = record.bits, half
        self.bias = linear.bias
        scale = getattr(linear, "input_scale", None)
        self.register_buffer("input_scale", None if scale is None else scale.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.minicpm_coreml.blockwise_dequantize(self.codes, self.scales, self.zeros, self.bits,
                                                             self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def install_record(model: nn.Module, name: str, record: QuantRecord, half: bool) -> None:
    """The Linear `name` becomes the `BlockwiseLinear` of `record` (its own weight is not read: it may be on the
    meta device)."""
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise UserError(f"quantisation record {name} is a {type(linear).__name__}; Core ML int4/int8 weights "
                        "are written for Linear layers only")
    if tuple(linear.weight.shape) != record.shape:
        raise UserError(f"quantisation record {name} is {list(record.shape)}, the weight is "
                        f"{list(linear.weight.shape)}")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, BlockwiseLinear(linear, record, half))


def install_records(model: nn.Module, records: dict[str, QuantRecord], half: bool) -> None:
    """Install every record, each checked first against the model's weight, which quantized_model set to the
    record's dequantised values: a record that does not match would silently write other weights."""
    for name, record in records.items():
        record.check(name)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"quantisation record {name} names no module of the model") from None
        if isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == record.shape and not torch.equal(
                linear.weight.detach().float(), record.dequantize(torch.float32)):
            raise UserError(f"quantisation record {name} does not match the model's weight (install the records "
                            "into the model before exporting, as quant.checkpoint.load_quantized does)")
        install_record(model, name, record, half)


def prepare_model(ckpt: Checkpoint, quant: str | None = None, group_size: int | None = None,
                  lm_head: str | None = None, samples: int = 64, seq_len: int = 512,
                  calib: str | None = None, quantize_audio: bool | None = None) -> tuple[MiniCPMV, dict, Quantization]:
    """The float32 model with its quantised weights installed as float values, the records to write (LLM, and
    audio encoder with quantize_audio), and a summary (export.quantization). Defaults for Core ML: quant None = a
    quantised checkpoint's own method, else int4-awq; lm_head None = int8 when quantising."""
    return quantized_model(ckpt, quant, group_size, None, lm_head, samples, calib, seq_len, default="int4-awq",
                           default_lm_head="int8", quantize_audio=quantize_audio)


@dataclass
class CoreMLWeights:
    """export.coreml's model, read one part at a time (`with weights.part(VISION): ...`): streamed from the
    checkpoint (`streamed`, each part's Linears installed as their codes and released when its block ends), or
    the whole float model with every record installed (AWQ, quantised directories; parts are no-ops)."""

    model: MiniCPMV
    quant: Quantization
    records: dict[str, QuantRecord]  # every record installed so far (all of them once each part was read)
    half: bool  # float16 scales in the package (fp16 programs)
    streamed: StreamedWeights | None = None

    @contextlib.contextmanager
    def part(self, prefixes: tuple[str, ...]) -> Iterator[None]:
        if self.streamed is None:
            yield
            return

        def install(name: str, record: QuantRecord) -> None:
            self.records[name] = record
            install_record(self.model, name, record, self.half)

        with self.streamed.part(prefixes, install):
            yield

    def embedding_table(self) -> torch.Tensor:
        """The token embedding table for token_embedding.bin (a streamed model reads it from the checkpoint)."""
        return token_embedding_table(self.model) if self.streamed is None else self.streamed.embedding_table()


def open_weights(ckpt: Checkpoint, args: argparse.Namespace) -> CoreMLWeights:
    """Streamed for `--quant int4-rtn` / `none` on a checkpoint (each part read when its package is converted: no
    float copy of the LLM, and the vision weights gone before the LLM's are read), else the whole float32 model
    with the records installed (AWQ calibrates on it). The same codes either way."""
    half = args.precision == "fp16"
    if (ckpt.path / "quant_config.json").is_file() or args.quant in (None, "int4-awq"):
        model, records, quant = prepare_model(ckpt, args.quant, args.group_size, args.lm_head, args.samples,
                                              args.seq_len, args.calib, args.quantize_audio or None)
        install_records(model, records, half)
        return CoreMLWeights(model, quant, records, half)
    lm_head = args.lm_head or ("int8" if args.quant != "none" else "keep")  # Core ML's default head
    streamed = StreamedWeights(ckpt, argparse.Namespace(**{**vars(args), "lm_head": lm_head}, symmetric=False,
                                                        accuracy_level=0), torch.float32, audio_level=0)
    streamed.model.eval().requires_grad_(False)
    return CoreMLWeights(streamed.model, streamed.quant, {}, half, streamed)


def register_converter() -> None:
    """Teach coremltools' torch frontend `minicpm_coreml::blockwise_dequantize` (once; import_coremltools calls
    this). The constexpr is named after the weight it replaces, `p_<module path>_weight`, as coremltools names a
    converted parameter."""
    from coremltools.converters.mil.frontend import _utils  # noqa: PLC0415
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs  # noqa: PLC0415
    from coremltools.converters.mil.frontend.torch.torch_op_registry import (  # noqa: PLC0415
        _TORCH_OPS_REGISTRY,
        register_torch_op,
    )
    from coremltools.converters.mil.mil import types  # noqa: PLC0415

    if "minicpm_coreml::blockwise_dequantize" in _TORCH_OPS_REGISTRY:
        return

    @register_torch_op(torch_alias=["minicpm_coreml::blockwise_dequantize", "minicpm_coreml.blockwise_dequantize"])
    def minicpm_blockwise_dequantize(context, node):
        codes, scales, zeros, bits, half = _get_inputs(context, node, expected=5)
        storage = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits.val}"))
        scale = scales.val.astype(np.float16 if half.val else np.float32)
        weight = "p_" + codes.name.removeprefix("b_").removesuffix("_codes") + "_weight"
        data = codes.val.view(storage)  # uint8 codes relabelled uint4 / uint8 in place: no copy of the weights
        context.add(_utils._construct_constexpr_dequant_op(data, zeros.val.astype(storage), scale, name=weight),
                    node.name)
