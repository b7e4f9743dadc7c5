"""Quantisation records as onnxruntime's `com.microsoft.MatMulNBits`, one node per quantised Linear.

Before tracing, each recorded nn.Linear becomes a `MatMulNBitsLinear` that holds the packed tensors as buffers
and calls the custom op `minicpm_mobile::matmul_nbits`. Its eager kernel dequantises exactly as quant/ does
((codes - zeros) * scales in float32), so the module computes what `QuantResult.model` computes; the exporter
translates the op into a single MatMulNBits node (`TRANSLATION`), so the graph holds the records' codes bit for
bit. (Post-export surgery on the Linear's weight would be fragile: the dynamo exporter constant-folds the
weight's Transpose into an anonymous initializer.)

Packing (onnxruntime contrib op spec, checked numerically against onnxruntime 1.31):
    B            uint8 [N, K / block, block * bits / 8]: row n, block k holds that group's codes, two per byte
                 for 4 bits (low nibble first), one per byte for 8 bits
    scales       [N, K / block] in the graph's float type (float16 record scales: exact in float32 and float16)
    zero_points  uint8 [N, ceil(blocks * bits / 8)]: 4-bit zero points two per byte along each row, padded per
                 row; omitted when every zero point is 2^(bits-1) (8, or 128 for int8), the op's default
An explicit AWQ input scale is a `Mul` in front of the node; the Linear's bias is the node's bias input.
The CPU kernel takes block sizes 16..256 only: a group larger than that (the per-row int8 lm_head, group = K)
is written as several blocks repeating the group's scale and zero point, which dequantise identically.
"""

import functools

import torch
from torch import nn
from torch.nn import functional as F

from quant.records import QuantRecord

OP_NAMESPACE = "minicpm_mobile"
ORT_BLOCK_SIZES = (256, 128, 64, 32, 16)  # what onnxruntime's CPU MatMulNBits kernel accepts
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 4: int8 activations on CPU (fast); 0 / 1: float32 compute
TENSORS = ("qweight", "scales", "qzeros", "input_scale", "bias")  # initializer suffixes, after the record's name


def block_size_for(group_size: int) -> int | None:
    """The largest block size onnxruntime accepts that divides `group_size` (None: the group cannot be written)."""
    return next((b for b in ORT_BLOCK_SIZES if group_size % b == 0), None)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., X] -> [..., ceil(X / 2)]: element 2i in the low nibble, 2i + 1 in the high one."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :count]


def pack_record(record: QuantRecord, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A QuantRecord as MatMulNBits (B, scales, zero_points or None), scales still float16."""
    n, k = record.shape
    repeat = record.group_size // block_size  # blocks per record group (1 unless the group exceeds 256)
    blocks = k // block_size
    scales = record.scales.repeat_interleave(repeat, dim=1)
    zeros = record.zeros.repeat_interleave(repeat, dim=1)
    codes = record.codes.reshape(n, blocks, block_size)
    if record.bits == 4:
        qweight, qzeros = _pack_nibbles(codes), _pack_nibbles(zeros)
    else:
        qweight, qzeros = codes, zeros
    if bool((zeros == 1 << (record.bits - 1)).all()):
        qzeros = None  # the op's default zero point: symmetric records need no tensor
    return qweight.contiguous(), scales.contiguous(), None if qzeros is None else qzeros.contiguous()


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, K: int,
                      N: int, bits: int, block_size: int) -> torch.Tensor:
    """MatMulNBits' weight as float32 [N, K]: (codes - zero_points) * scales, the arithmetic of quant.codes."""
    blocks = K // block_size
    codes = _unpack_nibbles(qweight, block_size) if bits == 4 else qweight
    if zero_points is None:
        zeros = torch.full((N, blocks), float(1 << (bits - 1)))
    else:
        zeros = (_unpack_nibbles(zero_points, blocks) if bits == 4 else zero_points).float()
    w = (codes.float() - zeros[..., None]) * scales.float()[..., None]
    return w.reshape(N, K)


@torch.library.custom_op(f"{OP_NAMESPACE}::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, K: int, N: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """x @ dequantize(B).T + bias; accuracy_level only matters to onnxruntime (eager is exact)."""
    weight = dequantize_packed(qweight, scales, zero_points, K, N, bits, block_size).to(x.dtype)
    return F.linear(x, weight, bias)


@matmul_nbits.register_fake
def _(x, qweight, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@functools.cache
def _matmul_nbits_op():
    import onnxscript  # noqa: PLC0415
    from onnx.defs import OpSchema  # noqa: PLC0415

    param, optional, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional, OpSchema.Attribute
    floats = ["tensor(float)", "tensor(float16)"]
    # onnx has no schema for contrib ops and onnxscript needs one to build the node: the contrib op's signature.
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional), param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)", *floats], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[attr("K", OpSchema.AttrType.INT), attr("N", OpSchema.AttrType.INT),
                    attr("bits", OpSchema.AttrType.INT), attr("block_size", OpSchema.AttrType.INT),
                    attr("accuracy_level", OpSchema.AttrType.INT, required=False)])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)


def _onnx_matmul_nbits(x, qweight, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    """The custom op as one com.microsoft MatMulNBits node (g_idx, deprecated, left out)."""
    return _matmul_nbits_op()(x, qweight, scales, zero_points, None, bias, K=K, N=N, bits=bits,
                              block_size=block_size, accuracy_level=accuracy_level)


TRANSLATION = {torch.ops.minicpm_mobile.matmul_nbits.default: _onnx_matmul_nbits}


class MatMulNBitsLinear(nn.Module):
    """y = (x * input_scale) @ w.T + bias with w held as MatMulNBits tensors (buffers `qweight`, `scales`,
    `qzeros`, `input_scale`; `bias` stays the Linear's parameter)."""

    def __init__(self, linear: nn.Linear, record: QuantRecord, dtype: torch.dtype, accuracy_level: int):
        super().__init__()
        self.out_features, self.in_features = record.shape
        self.bits = record.bits
        self.block_size = block_size_for(record.group_size)
        self.accuracy_level = accuracy_level
        qweight, scales, qzeros = pack_record(record, self.block_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("qzeros", qzeros)
        scale = record.input_scale
        self.register_buffer("input_scale", None if scale is None else scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # as InputScaledLinear: one Mul in front of the matmul
            x = x * self.input_scale.to(x.dtype)
        return torch.ops.minicpm_mobile.matmul_nbits(x, self.qweight, self.scales, self.qzeros, self.bias,
                                                     self.in_features, self.out_features, self.bits, self.block_size,
                                                     self.accuracy_level)


def install(model: nn.Module, records: dict[str, QuantRecord], dtype: torch.dtype, accuracy_level: int) -> None:
    """Replace every recorded Linear of `model` with a MatMulNBitsLinear. Each Linear must compute exactly its
    record's function (weight = dequantised codes, same input scale): the graph is built from the records, so
    that is what makes the traced module the PyTorch reference of the model it came from."""
    from minicpm.errors import UserError  # noqa: PLC0415

    for name, record in records.items():
        record.check(name)
        linear = model.get_submodule(name)
        scale = getattr(linear, "input_scale", None)  # InputScaledLinear's multiplier
        same_scale = (scale is None and record.input_scale is None) or (
            scale is not None and record.input_scale is not None
            and torch.equal(scale.float(), record.input_scale.float()))
        if not same_scale or not torch.equal(linear.weight.detach(), record.dequantize().to(linear.weight.dtype)):
            raise UserError(f"quantisation record {name} does not match the model's layer (install the records "
                            "into the model first, as quant.checkpoint.load_quantized does)")
        replace(model, name, record, dtype, accuracy_level)


def replace(model: nn.Module, name: str, record: QuantRecord, dtype: torch.dtype, accuracy_level: int) -> None:
    """Put a MatMulNBitsLinear of `record` in place of the Linear `name` (its bias, if any, must be loaded)."""
    from minicpm.errors import UserError  # noqa: PLC0415

    if block_size_for(record.group_size) is None:
        raise UserError(f"quantisation record {name}: group size {record.group_size} is not a multiple of 16, "
                        "which onnxruntime's MatMulNBits needs" + (" (--lm-head keep)" if record.bits == 8 else ""))
    parent, _, child = name.rpartition(".")
    linear = model.get_submodule(name)
    setattr(model.get_submodule(parent), child, MatMulNBitsLinear(linear, record, dtype, accuracy_level))


def initializer_names(step: nn.Module, model: nn.Module, records: dict[str, QuantRecord]) -> dict[str, str]:
    """Exported initializer name (the traced step's module path) -> the record's name: e.g.
    `layers.0.self_attn.q_proj.qweight` -> `llm.model.layers.0.self_attn.q_proj.qweight`."""
    paths = {id(m): n for n, m in step.named_modules()}
    names = {}
    for name in records:
        module = model.get_submodule(name)
        if isinstance(module, MatMulNBitsLinear) and id(module) in paths:
            for suffix in TENSORS:
                names[f"{paths[id(module)]}.{suffix}"] = f"{name}.{suffix}"
    return names


def rename_initializers(model_proto, names: dict[str, str]) -> int:
    """Rename initializers (and every use of them) in place; returns how many were renamed."""
    renamed = 0
    for init in model_proto.graph.initializer:
        if init.name in names:
            init.name = names[init.name]
            renamed += 1
    for node in model_proto.graph.node:
        for i, value in enumerate(node.input):
            if value in names:
                node.input[i] = names[value]
    for info in model_proto.graph.value_info:
        if info.name in names:
            info.name = names[info.name]
    return renamed

