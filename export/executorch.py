"""`python -m export.executorch`: one ExecuTorch program (`model.pte`) with the LLM runner's method names, the
raw token embedding table and the manifest.

Methods of the program (ExecuTorch multimodal runner conventions):
- `vision_encoder(pixel_values, position_ids, patch_mask, pos_embed) -> features`: the ONNX vision graph's
  inputs (fixed patch row, host NaViT position ids, patch mask, resampler position table) for one slice per
  call. A static batch of 1 bounds the activation arena to one slice (the attention scores of a batch of 8
  real slices would take ~600 MB) and lowers faster; the host loops over slices.
- `video_encoder(...)` (MiniCPM-V 4.5): the same inputs with a frame-slot axis, [1, 6, ...], one frame group per
  call -> [1, query_num, H] through the 3D resampler (unused slots: patch mask 0); the vision weights are the
  program's one copy, shared with `vision_encoder`.
- `audio_encoder(mel, conv_mask, position_ids, attention_mask) -> tokens [C/pool, H]` (MiniCPM-o): one 1 s
  chunk of a clip per call, `AudioChunkStep` with the encoder cache of the clip's earlier chunks in mutable
  buffers (`StatefulAudioEncoder`); fixed shapes. Float, or with `--quantize-audio` (opt-in) the Whisper
  blocks' symmetric int4 records as 8da4w, exactly as the LLM's (below).
- `token_embedding(input_ids [1,T]) -> [1,T,H]`: the raw table lookup (the host applies the manifest's
  prompt embedding scale). The Python host reads `token_embedding.bin` instead, as for every format.
- `text_decoder(inputs_embeds [1,T,H], position_ids [1,T], attention_mask [1,1,T,C+T], last_index [1])
  -> logits [1,V]`. XNNPACK: T = 1..prefill_chunk, one method for chunked prefill and decode (weights stored
  once). Core ML (static shapes: a dynamic token axis hands coremltools SymInt inputs it cannot take):
  `text_decoder` at T = 1, the runner's token-by-token form, plus `prefill` at T = prefill_chunk, sharing
  the same cache buffers.
- constants `get_max_seq_len` (tokens per decoder call), `get_max_context_len` (C), `get_bos_id`,
  `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape`.

KV cache. The decoder keeps it in mutable buffers `k_cache_{i}` [1, kv_heads, head_dim, C + S] (keys stored
transposed, ready for q @ K) and `v_cache_{i}` [1, kv_heads, C + S, head_dim], S = prefill_chunk. The inputs
are those of the ONNX LLM graph minus the past K/V, so the host builds the very same mask (keys: C cache
slots, then the T new tokens). Inside the graph the T new K/V are written to slots `position_ids[0,0] + [0, T)`
(the first new position is the number of filled slots: session.py's schedule) and the mask is moved onto the
buffer: columns [0, C) as given, the new tokens' columns at their slots, the S slack columns masked. The slack
takes the padded rows of a last prefill chunk near the end of the context, so every write stays in bounds
without clamping. Masked slots contribute exact zeros, so the cache never needs clearing for correctness, only
to hold finite values (it is zero after load; `ExecuTorchBackend.reset()` zeroes it in place by name).
Programs are written with `MemoryPlanningPass(share_mutable_buffers=True)`: the buffers get their own memory
(id 2). Without it they sit in the activation arena that ExecuTorch shares between host-only methods, and a
`vision_encoder` call between two turns overwrites the conversation's cache (measured).

Quantisation (`--quant int4-awq|int4-rtn`): symmetric int4 records (quant/) applied as torchao
`IntxUnpackedToInt8Tensor` weights with the records' exact codes. On XNNPACK they run as "8da4w" (int8
dynamic per-token activations, the form of `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
weight_granularity=PerGroup(g))`); XNNPACK has no zero points for int4 and stores group scales as bfloat16,
so asymmetric records are refused and the scales are rounded to bfloat16 in the PyTorch reference too (the
program and its reference then hold identical weights; the rounding is reported). `--backend coreml` lowers
through the Core ML delegate with weight-only int4 (float16 scales kept); it builds on Linux but cannot load
here, so it is checked structurally only.

ExecuTorch 1.5.1 behaviours worked around (each found by a parity or speed measurement; the modules behind the
methods are in export/executorch_modules.py):
- XNNPACK lowers `gelu(approximate="tanh")` as the exact erf GELU: the tanh form is spelled out (`_tanh_gelu`).
- `buffer[:, :, slots] = x` drops x's leading unit axis, which the in-place index_put kernel rejects;
  re-inplacing an index_put on an ordinary tensor (the mask) gives wrong logits: `index_put_` on buffers
  only, spelled out, and a gather for the mask.
- run_layers' GQA repeat_interleave and K transpose copy the whole cache per layer in portable kernels
  (mid-size decode 6 tok/s): `StatefulDecoder` keeps K transposed and stacks query heads instead.
- nn.MultiheadAttention's packed in-projection leaves three products to portable kernels (18 s per mid-size
  slice): `SplitProjectionAttention`.
- numpy's `[None]` gives stride-0 axes, which ExecuTorch rejects: inputs are copied (`as_tensor`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.bundle import (
    VIDEO_FRAME_SLOTS,
    _human,
    add_export_arguments,
    audio_example,
    audio_step,
    build_manifest,
    check_export_arguments,
    copy_model_files,
    file_entry,
    max_abs_error,
    staged_directory,
    video_example,
    write_embedding_table,
)
from export.executorch_modules import (
    StatefulAudioEncoder,
    StatefulDecoder,
    TokenEmbedding,
    as_tensor,
    decoder_inputs,
    video_step,
    vision_step,
)
from export.quantization import QUANT_METHODS, Quantization, add_quantize_audio_argument, quantized_model
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep, LanguageModelStep
from runtime.cli import run
from runtime.manifest import write_manifest

PROGRAM = "model.pte"
METHODS = ["vision_encoder", "video_encoder", "audio_encoder", "token_embedding", "text_decoder", "prefill"]
VISION_INPUTS = ["pixel_values", "position_ids", "patch_mask", "pos_embed"]
AUDIO_INPUTS = ["mel", "conv_mask", "position_ids", "attention_mask"]  # AudioChunkStep's, minus the past K/V
PARITY_KEYS = {"audio_encoder": "audio"}  # manifest parity key of a method, where it is not the method's name
DECODER_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index"]
LINEAR_OPS = ("aten_linear_default", "aten_mm_default", "aten_addmm_default")  # edge node names


# ---------------------------------------------------------------------------------------------------------
# Quantisation: symmetric int4 records -> torchao weights
# ---------------------------------------------------------------------------------------------------------


def install_records(model: nn.Module, records: dict, activations_int8: bool, bf16_scales: bool) -> dict:
    """Replace the weight of every Linear named by a record with a torchao `IntxUnpackedToInt8Tensor` holding
    the record's codes as signed values (q = code - 8 for int4, code - 128 for int8), its scales and zero
    points 0: int4 groupwise for the LLM blocks, int8 per output channel for an int8 lm_head record.

    activations_int8: int8 dynamic per-token activations ("8da4w", XNNPACK) instead of weight-only (Core ML).
    bf16_scales: round int4 scales to bfloat16, which is what XNNPACK stores for them: groupwise, and also an int4
    group spanning the whole row (it is lowered blockwise; measured: float32 scales there part the reference by
    ~1e-3); int8 per-channel scales stay float32 there, so float16 record scales are exact.
    Returns the manifest facts: scheme, scale dtype and the largest relative rounding of a group scale."""
    from torchao.quantization import IntxUnpackedToInt8Tensor  # noqa: PLC0415

    facts = {"scheme": "8da4w" if activations_int8 else "int4 weight-only",
             "scale_dtype": "bfloat16" if bf16_scales else "float16", "max_scale_rounding": 0.0}
    for name, record in records.items():
        half = 1 << (record.bits - 1)
        if not record.symmetric or not bool((record.zeros == half).all()):
            raise UserError(f"quantisation record {name} is asymmetric (zero points); ExecuTorch's XNNPACK int4 "
                            "kernels have no zero points and would silently drop them: quantise with "
                            "`python -m quant.awq --symmetric` (or let this exporter quantise)")
        module = model.get_submodule(name)
        scale = record.scales.float()
        if bf16_scales and (record.bits == 4 or record.group_size < module.in_features):
            rounded = scale.to(torch.bfloat16).float()
            facts["max_scale_rounding"] = max(facts["max_scale_rounding"],
                                              float(((rounded - scale).abs() / scale).max()))
            scale = rounded
        qdata = (record.codes.to(torch.int16) - half).to(torch.int8)
        weight = IntxUnpackedToInt8Tensor(
            qdata, scale.to(module.weight.dtype), torch.zeros(scale.shape, dtype=torch.int8),
            torch.int4 if record.bits == 4 else torch.int8, (1, record.group_size), module.weight.dtype,
            "int8_asym_per_token" if activations_int8 else None)
        module.weight = nn.Parameter(weight, requires_grad=False)
    return facts


def prepare_model(ckpt: Checkpoint, quant: str | None = None, group_size: int | None = None,
                  backend: str = "xnnpack", lm_head: str | None = None, samples: int = 32,
                  calib: str | None = None, quantize_audio: bool | None = None) -> tuple[MiniCPMV, Quantization, dict]:
    """The float32 model the program is traced from, with the records' weights installed as torchao tensors,
    the quantisation summary (export.quantization) and the format's manifest facts (`install_records`).
    Its eager modules are the program's PyTorch reference (the tests generate with it).

    quant None = a quantised checkpoint directory's own method (its records are used as they are), else none.
    Records are symmetric: XNNPACK's int4 kernels have no zero points (asymmetric directories are refused)."""
    model, records, info = quantized_model(ckpt, quant, group_size, True, lm_head, samples, calib,
                                           quantize_audio=quantize_audio)
    if not records:
        return model, info, {}
    xnnpack = backend == "xnnpack"
    return model, info, install_records(model, records, activations_int8=xnnpack, bf16_scales=xnnpack)


# ---------------------------------------------------------------------------------------------------------
# Export and lowering
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One method of the program: the torch module, its example inputs and dynamic shapes."""

    module: nn.Module
    example: tuple
    dynamic: tuple | None = None


def build_methods(model: MiniCPMV, max_context: int, chunk: int, max_patches: int,
                  backend: str = "xnnpack") -> dict[str, Method]:
    """Modules + example inputs. Examples have 2+ rows on every dynamic axis: length-1 examples specialise."""
    from minicpm.image_processing import process_image  # noqa: PLC0415

    image = np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8)
    slices = process_image(image, model.config.slice)
    inputs = model.vision_inputs(slices.pixel_values[:1], slices.tgt_sizes[:1], pad_to=max_patches)
    methods = {"vision_encoder": Method(vision_step(model), tuple(inputs[n] for n in VISION_INPUTS))}
    if model.resampler.temporal:
        group = video_example(model, max_patches)
        methods["video_encoder"] = Method(video_step(model), tuple(group[n][:1] for n in VISION_INPUTS))
    if hasattr(model, "apm"):  # MiniCPM-o: traced at the middle chunk of the parity example (a filled cache)
        middle = audio_example(model)[1]
        methods["audio_encoder"] = Method(StatefulAudioEncoder(model).eval(),
                                          tuple(as_tensor(middle[n].numpy()) for n in AUDIO_INPUTS))
    ids = torch.export.Dim("ids", min=1, max=max_context)
    methods["token_embedding"] = Method(TokenEmbedding(model).eval(), (torch.tensor([[1, 2, 3]]),), ({1: ids},))

    decoder = StatefulDecoder(model, max_context, chunk).eval()  # one module: the methods share its buffers
    hidden = model.config.hidden_size

    def example(tokens: int) -> tuple:
        step = decoder_inputs(np.random.RandomState(0).randn(tokens, hidden).astype(np.float32), 3, tokens,
                              max_context)
        return tuple(as_tensor(step[n]) for n in DECODER_INPUTS)

    if backend == "xnnpack" and chunk > 1:
        tokens = torch.export.Dim("tokens", min=1, max=chunk)
        methods["text_decoder"] = Method(decoder, example(min(chunk, 8)),
                                         ({1: tokens}, {1: tokens}, {2: tokens, 3: tokens + max_context}, None))
    else:
        methods["text_decoder"] = Method(decoder, example(1))
        if chunk > 1:
            methods["prefill"] = Method(decoder, example(chunk))
    return methods


def _tanh_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU's tanh approximation spelled out (mul, add, tanh: all XNNPACK ops). ExecuTorch 1.5.1's XNNPACK
    delegate takes `gelu(approximate="tanh")` but lowers it as the exact erf GELU, an error of up to ~2e-4 per
    activation in the SigLIP MLPs (`gelu_pytorch_tanh`). Exact GELU is left alone."""
    if approximate != "tanh":
        return NotImplemented
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def export_methods(methods: dict[str, Method]) -> dict[str, torch.export.ExportedProgram]:
    programs = {}
    with torch.no_grad(), warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        for name, method in methods.items():
            program = torch.export.export(method.module, method.example, dynamic_shapes=method.dynamic, strict=False)
            programs[name] = program.run_decompositions({torch.ops.aten.gelu.default: _tanh_gelu})
    return programs


def partitioners(backend: str, dtype: torch.dtype, names: list[str]) -> dict[str, list]:
    """The delegate's partitioner for each method."""
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: PLC0415

        return {name: [XnnpackPartitioner()] for name in names}
    import coremltools as ct  # noqa: PLC0415
    from executorch.backends.apple.coreml.compiler import CoreMLBackend  # noqa: PLC0415
    from executorch.backends.apple.coreml.compiler.coreml_preprocess import (  # noqa: PLC0415
        MULTIMETHOD_WEIGHT_SHARING_STRATEGY,
    )
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner  # noqa: PLC0415

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=ct.target.iOS18,  # int4 blockwise weights need iOS 18
        compute_precision=ct.precision.FLOAT32 if dtype == torch.float32 else ct.precision.FLOAT16)
    # Vision and decoder are different networks: positional weight sharing (for twins) does not apply.
    specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
        MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
    # The KV cache stays an ExecuTorch buffer (shared, named, zeroable) rather than a Core ML state, so the
    # program keeps the XNNPACK program's contract; Core ML runs the compute between the cache writes, which
    # stay portable ops (coremltools 9.0 cannot convert an index_put at a runtime position).
    coreml = CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False,
                               skip_ops_for_coreml_delegation=["aten.index_put.default"])
    # The embedding lookup (dynamic length, a memcpy) stays a portable op.
    return {name: [] if name == "token_embedding" else [coreml] for name in names}


def lower(programs: dict, backend: str, metadata: dict, dtype: torch.dtype):
    """to_edge_transform_and_lower + to_executorch -> (ExecutorchProgramManager, the edge manager)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower  # noqa: PLC0415
    from executorch.exir.passes import MemoryPlanningPass  # noqa: PLC0415

    # coremltools draws a progress bar per pass and partition: noise here, the summary says what happened.
    chatter = contextlib.redirect_stderr(io.StringIO()) if backend == "coreml" else contextlib.nullcontext()
    with warnings.catch_warnings(), _quiet(), chatter:
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(programs, partitioner=partitioners(backend, dtype, list(programs)),
                                           constant_methods=metadata,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        program = edge.to_executorch(ExecutorchBackendConfig(
            # The cache buffers get their own memory, shared by every method (see the module docstring).
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,  # hosts find (and may zero) k_cache_{i} / v_cache_{i} by name
            run_reinplace_pass=True,  # cache writes in place, not a copy of the whole buffer per call
        ))
    return program, edge


def metadata_methods(ckpt: Checkpoint, max_context: int, chunk: int, dynamic: bool) -> dict:
    """The LLM runner's constant methods."""
    tok = ckpt.tokenizer
    # BOS is what every prompt starts with: the tokenizer's, else the chat template's <|im_start|>.
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.convert_tokens_to_ids("<|im_start|>")
    return {"get_max_seq_len": chunk, "get_max_context_len": max_context, "get_bos_id": int(bos),
            "get_eos_ids": [int(i) for i in ckpt.stop_ids], "use_kv_cache": True, "enable_dynamic_shape": dynamic}


def delegation(edge, backend_id: str) -> dict[str, dict]:
    """Per method: delegated subgraphs / nodes, nodes left to portable kernels, and how many of the matrix
    products with a weight (linear / mm / addmm nodes) run inside a delegate."""
    from executorch.devtools.backend_debug import get_delegation_info  # noqa: PLC0415

    out = {}
    for name in sorted(edge.methods, key=METHODS.index):
        gm = edge.exported_program(name).graph_module
        info = get_delegation_info(gm)
        by_op = info.delegation_by_operator
        backends = sorted({getattr(gm, n.target).backend_id for n in gm.graph.nodes
                           if n.op == "get_attr" and n.target.startswith("lowered_module")})
        if backends and backends != [backend_id]:
            raise RuntimeError(f"{name}: delegated to {backends}, expected {backend_id}")
        out[name] = {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
                     "portable_nodes": info.num_non_delegated_nodes,
                     "linear_delegated": sum(by_op[op].delegated for op in LINEAR_OPS if op in by_op),
                     "linear_ops": sum(by_op[op].delegated + by_op[op].non_delegated for op in LINEAR_OPS
                                       if op in by_op),
                     "backends": backends}
    return out


def method_bytes(edge) -> dict[str, int]:
    """Bytes each method brings to the program: its delegate blobs, the named weights they reference and the
    constants its portable ops read (weights shared between methods count for each of them)."""
    out = {}
    for name in edge.methods:
        program = edge.exported_program(name)
        gm, signature = program.graph_module, program.graph_signature
        named, total = {}, 0
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.startswith("lowered_module"):
                lowered = getattr(gm, node.target)
                total += len(lowered.processed_bytes)
                store = lowered.named_data_store_output
                for key, entry in (store.pte_data if store is not None else {}).items():
                    named[key] = len(store.buffers[entry.buffer_index])
        mutated = set(signature.buffers_to_mutate.values())
        constants = {**signature.inputs_to_parameters, **signature.inputs_to_lifted_tensor_constants,
                     **{k: v for k, v in signature.inputs_to_buffers.items() if v not in mutated}}
        tensors = {**program.state_dict, **program.constants}
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in constants and node.users:
                value = tensors.get(constants[node.name])
                total += value.nbytes if isinstance(value, torch.Tensor) else 0
        out[name] = total + sum(named.values())
    return out


def count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


# ---------------------------------------------------------------------------------------------------------
# Parity: the program through executorch.runtime against the torch modules it was traced from
# ---------------------------------------------------------------------------------------------------------


def load_program(path: Path):
    from executorch.runtime import Runtime  # noqa: PLC0415

    return Runtime.get().load_program(path)


@torch.no_grad()
def parity(path: Path, methods: dict[str, Method], model: MiniCPMV, max_context: int, chunk: int) -> dict[str, float]:
    """Max |error| of each method against its torch module: vision on a real slice, the embedding on edge ids,
    the decoder over a whole schedule (see `decoder_parity`), the audio encoder over a clip (`audio_parity`)."""
    program = load_program(path)
    errors = {}
    vision = methods["vision_encoder"]
    errors["vision_encoder"] = max_abs_error(program.load_method("vision_encoder").execute(list(vision.example))[0],
                                             vision.module(*vision.example))
    if "video_encoder" in methods:  # both example groups (4 and 2 of the 6 frame slots used), one per call
        video = methods["video_encoder"]
        groups = video_example(model, max_patches=video.example[3].shape[2])  # pos_embed [1, frames, P, H]
        method = program.load_method("video_encoder")
        errors["video_encoder"] = max(
            max_abs_error(method.execute([groups[n][i:i + 1] for n in VISION_INPUTS])[0],
                          video.module(*(groups[n][i:i + 1] for n in VISION_INPUTS)))
            for i in range(len(groups["pixel_values"])))
    if "audio_encoder" in methods:
        errors["audio"] = audio_parity(program.load_method("audio_encoder"), model)
    ids = torch.tensor([[0, 5, 1, model.config.llm.vocab_size - 1]])
    errors["token_embedding"] = max_abs_error(program.load_method("token_embedding").execute([ids])[0],
                                              methods["token_embedding"].module(ids))
    errors["text_decoder"] = decoder_parity(program.load_method("text_decoder").execute, model, max_context, chunk)
    return errors


@torch.no_grad()
def decoder_parity(execute: Callable[[list], list], model: MiniCPMV, max_context: int, chunk: int,
                   seed: int = 0) -> float:
    """Run a schedule through a fresh stateful `execute` and through `LanguageModelStep` with a host-held
    cache (what the ONNX/torch backends do): a full prefill chunk, two decode steps, then a padded chunk at the
    end of the context whose pad rows land in the slack. The max |logit difference| over all calls."""
    step = LanguageModelStep(model, max_context).eval()
    shape = (len(step.layers), step.kv_heads, max_context, step.head_dim)
    keys, values = torch.zeros(shape), torch.zeros(shape)
    rng = np.random.RandomState(seed)
    hidden = model.config.hidden_size
    tail = max(1, chunk - 2)
    calls = [(chunk, 0, chunk), (1, None, 1), (1, None, 1), (tail, max_context - tail, chunk)]
    past, error = 0, 0.0
    for n, start, width in calls:
        past = past if start is None else start
        inputs = decoder_inputs(rng.randn(n, hidden).astype(np.float32), past, width, max_context)
        tensors = [as_tensor(inputs[k]) for k in DECODER_INPUTS]
        got = execute(tensors)[0]
        expected, new_keys, new_values = step(*tensors, keys, values)
        keys[:, :, past:past + n] = new_keys[:, :, :n]
        values[:, :, past:past + n] = new_values[:, :, :n]
        error = max(error, max_abs_error(got, expected))
        past += n
    return error


@torch.no_grad()
def audio_parity(method, model: MiniCPMV) -> float:
    """The three chunks of `audio_example` in order through a fresh `audio_encoder` against `AudioChunkStep` with
    the host-held cache: max |error| of the tokens and of the K/V the method wrote to its buffers."""
    step = AudioChunkStep(model).eval()
    layers = len(model.apm.layers)
    error = 0.0
    for chunk in audio_example(model):
        tokens, keys, values = step(**chunk)
        got = method.execute([as_tensor(chunk[n].numpy()) for n in AUDIO_INPUTS])[0]
        error = max(error, max_abs_error(got, tokens))
        start, frames = int(chunk["position_ids"][0]), keys.shape[2]
        for i in range(layers):
            for kind, expected in (("k", keys), ("v", values)):
                buffer = method._method.get_attribute(f"audio_{kind}_cache_{i}")
                written = buffer[:, :, start:start + frames].transpose(1, 2) if kind == "k" else \
                    buffer[:, start:start + frames]
                error = max(error, max_abs_error(written, expected[i]))
    return error


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Export, lower, check parity, write the staged directory (model.pte, token_embedding.bin, model files,
    manifest.json) and print the summary table."""
    parser = argparse.ArgumentParser(prog="python -m export.executorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--quant", choices=QUANT_METHODS,
                        help="int4 weights of the LLM blocks, symmetric: AWQ (built-in calibration set, or --calib), "
                             "round-to-nearest, or none (default). A quantised checkpoint directory (python -m "
                             "quant.awq --symmetric) as --model brings its own records")
    add_quantize_audio_argument(parser)
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), help="input channels per int4 group (128)")
    parser.add_argument("--lm-head", choices=("keep", "int8"),
                        help="output head: float (keep, default) or int8 per channel (8da8w on XNNPACK)")
    parser.add_argument("--samples", type=int, default=32, help="AWQ calibration samples (default 32)")
    parser.add_argument("--calib", help="AWQ calibration JSONL (default: the built-in offline set)")
    parser.add_argument("--backend", choices=("xnnpack", "coreml"), default="xnnpack",
                        help="delegate: xnnpack (CPU, runs here) or coreml (Apple; built and checked structurally)")
    parser.add_argument("--dtype", choices=("fp32",), default="fp32", help="graph and weight precision")
    args = parser.parse_args(argv)
    check_export_arguments(args)
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415

    if is_hybrid_model(args.model):  # MiniCPM-V 4.6 / 4.7: the state in mutable buffers (export/executorch_hybrid.py)
        from export.executorch_hybrid import export_hybrid  # noqa: PLC0415

        return export_hybrid(args)
    dtype = torch.float32
    # Loading and quantising come before the progress bar, so a bad model or a conflicting --quant is one line
    # on stderr (AWQ shows its own progress).
    seconds = {}
    t = time.perf_counter()
    ckpt = Checkpoint.open(args.model)
    model, quant, facts = prepare_model(ckpt, args.quant, args.group_size, args.backend, args.lm_head, args.samples,
                                        args.calib, args.quantize_audio or None)
    seconds["load + quantise"] = time.perf_counter() - t
    bar = tqdm(total=5, desc="export.executorch", unit="step")
    with staged_directory(args.out) as out:
        bar.set_postfix_str("torch.export")
        t = time.perf_counter()
        try:
            methods = build_methods(model, args.max_context, args.prefill_chunk, args.max_patches, args.backend)
        except ValueError as e:
            raise UserError(str(e)) from None
        programs = export_methods(methods)
        seconds["export"] = time.perf_counter() - t
        bar.update()
        bar.set_postfix_str(f"lowering to {args.backend}")
        t = time.perf_counter()
        backend_id = "XnnpackBackend" if args.backend == "xnnpack" else "CoreMLBackend"
        metadata = metadata_methods(ckpt, args.max_context, args.prefill_chunk,
                                    dynamic=methods["text_decoder"].dynamic is not None)
        program, edge = lower(programs, args.backend, metadata, dtype)
        delegated = delegation(edge, backend_id)
        for name, size in method_bytes(edge).items():
            delegated[name]["bytes"] = size
        path = out / PROGRAM
        path.write_bytes(program.buffer)
        seconds["lower"] = time.perf_counter() - t
        bar.update()
        bar.set_postfix_str("parity")
        t = time.perf_counter()
        # Core ML programs build on Linux but load on Apple platforms only: no parity here.
        errors = parity(path, methods, model, args.max_context, args.prefill_chunk) if args.backend == "xnnpack" else {}
        seconds["parity"] = time.perf_counter() - t
        bar.update()
        bar.set_postfix_str("embedding table, tokenizer")
        specs = _method_specs(methods, model)
        for name, spec in specs.items():
            spec["delegation"] = delegated[name]
        artifacts = {"program": {**file_entry(out, PROGRAM), "format": "pte", "backend": backend_id,
                                 "methods": specs, "constant_methods": metadata},
                     "token_embedding": write_embedding_table(model, out, dtype)}
        files = copy_model_files(ckpt, out)
        bar.update()
        bar.set_postfix_str("manifest")
        prefill = "prefill" if "prefill" in methods else "text_decoder"
        steps = {"vision": {"artifact": "program", "function": "vision_encoder"},
                 **({"video": {"artifact": "program", "function": "video_encoder", "frames": VIDEO_FRAME_SLOTS,
                               "batch": 1}} if "video_encoder" in methods else {}),
                 **({"audio": audio_step(model, "program", "audio_encoder")} if "audio_encoder" in methods else {}),
                 "embedding": {"artifact": "program", "function": "token_embedding"},
                 "prefill": {"artifact": "program", "function": prefill, "tokens": args.prefill_chunk},
                 "decode": {"artifact": "program", "function": "text_decoder", "tokens": 1}}
        manifest = build_manifest("executorch", ckpt, args.model, artifacts, files, args, "float32",
                                  errors, quant.manifest(**facts), steps, model=model)
        decoder = methods["text_decoder"].module
        manifest["schedule"]["kv_cache"].update({
            "location": "program mutable buffers", "buffers": {"k_cache_{i}": list(decoder.k_cache_0.shape),
                                                               "v_cache_{i}": list(decoder.v_cache_0.shape)},
            "slack_slots": decoder.slack, "write_slots": "position_ids[0,0] + arange(T)"})
        if "audio_encoder" in methods:
            audio = methods["audio_encoder"].module
            shape = list(audio.audio_k_cache_0.shape)
            manifest["schedule"]["audio_cache"].update({
                "location": "program mutable buffers", "write_slots": "position_ids[0] + arange(frames)",
                "buffers": {"audio_k_cache_{i}": shape, "audio_v_cache_{i}": shape}})
        write_manifest(out, manifest)
        bar.update()
    bar.close()
    _print_summary(args, ckpt, artifacts, delegated, errors, methods, quant, facts, seconds)
    return 0


def _method_specs(methods: dict[str, Method], model: MiniCPMV) -> dict:
    """Input / output names, shapes (a dynamic axis by its name, e.g. "tokens" or "tokens + 4096") and dtypes."""
    h, q, v = model.config.hidden_size, model.config.query_num, model.config.llm.vocab_size
    inputs = {"vision_encoder": VISION_INPUTS, "video_encoder": VISION_INPUTS, "audio_encoder": AUDIO_INPUTS,
              "token_embedding": ["input_ids"],
              "text_decoder": DECODER_INPUTS,
              "prefill": DECODER_INPUTS}
    specs = {}
    for name, method in methods.items():
        tensors = []
        for label, x, dims in zip(inputs[name], method.example, method.dynamic or [None] * len(method.example),
                                  strict=True):
            shape: list = list(x.shape)
            for axis, dim in (dims or {}).items():
                shape[axis] = dim.__name__
            tensors.append({"name": label, "shape": shape, "dtype": str(x.dtype).removeprefix("torch.")})
        outputs = {"vision_encoder": ("features", [1, q, h]), "video_encoder": ("features", [1, q, h]),
                   "audio_encoder": ("tokens", [model.config.audio_chunk_frames // model.config.audio_pool_step, h])
                   if hasattr(model, "apm") else None,
                   "token_embedding": ("embeddings", [1, "ids", h]),
                   "text_decoder": ("logits", [1, v]), "prefill": ("logits", [1, v])}
        label, shape = outputs[name]
        specs[name] = {"inputs": tensors, "outputs": [{"name": label, "shape": shape, "dtype": "float32"}]}
    return specs


def _print_summary(args: argparse.Namespace, ckpt: Checkpoint, artifacts: dict, delegated: dict, errors: dict,
                   methods: dict[str, Method], quant: Quantization, facts: dict, seconds: dict) -> None:
    """method, parity vs torch, delegation (subgraphs, nodes in / out of delegates, linear layers delegated)."""
    scheme = facts.get("scheme", "fp32")
    print(f"\nExecuTorch export ({args.backend}, {scheme}) of {ckpt.config.variant.name} -> {args.out}")
    print(f"{'method':<18}{'size':>10}{'max |err|':>11}{'subgraphs':>11}{'delegated':>11}{'portable':>10}"
          f"{'linear ops delegated':>22}{'nn.Linear':>11}")
    for name, d in delegated.items():
        key = PARITY_KEYS.get(name, name)
        err = f"{errors[key]:.2e}" if key in errors else "-"
        linear = f"{d['linear_delegated']}/{d['linear_ops']}"
        print(f"{name:<18}{_human(d['bytes']):>10}{err:>11}{d['subgraphs']:>11}{d['delegated_nodes']:>11}"
              f"{d['portable_nodes']:>10}{linear:>22}{count_linears(methods[name].module):>11}")
    print(f"{PROGRAM} {_human(artifacts['program']['size'])} (every method, one file); token_embedding.bin "
          f"{_human(artifacts['token_embedding']['size'])} (the table the host indexes)")
    print(quant.describe() + (f" as {scheme}, {quant.int8_layers} int8, group scales {facts['scale_dtype']} "
                              f"(largest relative rounding {facts['max_scale_rounding']:.1e})" if facts else ""))
    for note in quant.notes:
        print(f"note: {note}")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))


class _quiet:
    """Silence the exporters' progress chatter (our own progress bar says what is happening)."""

    def __enter__(self):
        names = ("torch.export", "torch._dynamo", "torch._export", "executorch", "coremltools", "torchao", "root")
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)


if __name__ == "__main__":
    run(main)
