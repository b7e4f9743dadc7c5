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
- no `token_embedding` method (the runner convention's lookup): the table is stored once, in
  `token_embedding.bin`, which every host of this project reads (runtime/session.py, ios_bridge), as for every
  format. Nothing called the method, and the stock ExecuTorch multimodal runner cannot drive this program anyway
  (its `text_decoder` takes the host's mask and positions); kept, it stored the [V, H] table a second time (752 MB
  float32 on MiniCPM-V 4.0) and held it resident through the lowering.
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

Memory: lowering needs every method at once, so the resident model is made small first (export/executorch_weights.py):
with `--quant int4-rtn` or `none` the model starts on the meta device and each LLM Linear is read in bf16 and
installed as its int8-unpacked int4 codes at once (no float32 copy of the LLM), the table is not read. The parity
references (the torch modules' outputs) are computed before lowering, then the eager weights go: the exported
programs hold the only references, and `lower_each` lowers one method at a time, dropping each method's traced
weights once its delegates have serialised them. The program is written from its segments and every copy but the
file's is freed before parity loads it. AWQ and quantised directories load the whole float32 model. RSS after each
phase (now, and the peak so far: the process's high-water mark is never reset, so the bench's peak is the true one)
is printed after the summary.

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
- XNNPACK takes no layer norm, no mean over the last axis of a 3-D tensor and none of scaled_dot_product_attention's
  fully-masked-row guard (eq, any, logical_not, where): each cut a method into one more delegate subgraph (each
  preprocessed through ~17 graph passes, each a delegate call at run time). The layer norms are spelled out as
  means (`_layer_norm_as_means`), the means become global average pools (export.executorch_lowering's edge
  passes, shared with the 4.6 / 4.7 exporter), SigLIP's attention runs as transformers' eager matmuls and the
  resampler's as `explicit_attention`: the tiny V-4.0 vision method lowers as 2 subgraphs (18 before), its text
  decoder as 18 (23); the mid-size model's vision as 2 (30), 3x faster (median 295 ms per 448 slice, was 790 ms,
  2 cores).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass

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
    quiet_loggers,
    staged_directory,
    video_example,
    write_embedding_table,
)
from export.executorch_lowering import LOGGERS, delegation, lower_each, method_bytes
from export.executorch_modules import (
    AUDIO_INPUTS,
    DECODER_INPUTS,
    PARITY_KEYS,
    VISION_INPUTS,
    StatefulAudioEncoder,
    StatefulDecoder,
    as_tensor,
    decoder_inputs,
    video_step,
    vision_step,
)
from export.executorch_parity import parity, parity_references, vision_references
from export.onnx_weights import MemoryStatus, memory_note
from export.quantization import QUANT_METHODS, Quantization, add_quantize_audio_argument, quantized_model
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from runtime.cli import run
from runtime.manifest import write_manifest

PROGRAM = "model.pte"


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
    # SigLIP's attention as transformers' eager matmuls + softmax: its SDPA path brings a fully-masked-row guard
    # of portable ops (export.executorch_modules.explicit_attention). The model is the exporter's own.
    model.vpm.config._attn_implementation = "eager"
    methods = {"vision_encoder": Method(vision_step(model), tuple(inputs[n] for n in VISION_INPUTS))}
    if model.resampler.temporal:
        group = video_example(model, max_patches)
        methods["video_encoder"] = Method(video_step(model), tuple(group[n][:1] for n in VISION_INPUTS))
    if hasattr(model, "apm"):  # MiniCPM-o: traced at the middle chunk of the parity example (a filled cache)
        middle = audio_example(model)[1]
        methods["audio_encoder"] = Method(StatefulAudioEncoder(model).eval(),
                                          tuple(as_tensor(middle[n].numpy()) for n in AUDIO_INPUTS))
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


def _layer_norm_as_means(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5, cudnn_enable: bool = True):
    """Layer norm over the last axis as means, subtract, rsqrt, scale and shift, all XNNPACK ops once
    `mean_as_pooling` runs (layer norm is not one: each of SigLIP's and the resampler's norms cut the vision method
    into one more delegate subgraph and left the norm to a portable kernel)."""
    if len(normalized_shape) != 1:
        return NotImplemented
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    out = centred * rstd
    out = out * weight if weight is not None else out
    out = out + bias if bias is not None else out
    return out


def export_methods(methods: dict[str, Method], undecomposed: tuple[str, ...] = (), backend: str = "xnnpack"
                   ) -> dict[str, torch.export.ExportedProgram]:
    """torch.export each method, decomposed with the tanh GELU spelled out (and for XNNPACK the layer norms as
    means); the methods named in `undecomposed` are left to lowering's own decomposition, which keeps whole what
    the partitioner takes (linear: no mm + permute)."""
    table = {torch.ops.aten.gelu.default: _tanh_gelu}
    if backend == "xnnpack":
        table |= {torch.ops.aten.layer_norm.default: _layer_norm_as_means}
    programs = {}
    with torch.no_grad(), warnings.catch_warnings(), quiet_loggers(*LOGGERS):
        warnings.simplefilter("ignore")
        for name, method in methods.items():
            program = torch.export.export(method.module, method.example, dynamic_shapes=method.dynamic, strict=False)
            programs[name] = program if name in undecomposed else program.run_decompositions(table)
    return programs


def metadata_methods(ckpt: Checkpoint, max_context: int, chunk: int, dynamic: bool) -> dict:
    """The LLM runner's constant methods."""
    tok = ckpt.tokenizer
    # BOS is what every prompt starts with: the tokenizer's, else the chat template's <|im_start|>.
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.convert_tokens_to_ids("<|im_start|>")
    return {"get_max_seq_len": chunk, "get_max_context_len": max_context, "get_bos_id": int(bos),
            "get_eos_ids": [int(i) for i in ckpt.stop_ids], "use_kv_cache": True, "enable_dynamic_shape": dynamic}


def count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


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
    parser.add_argument("--vision-weights", choices=("float", "int8"), default="float",
                        help="vision encoder weights: float (default) or int8 per output channel with int8 dynamic "
                             "activations (8da8w on XNNPACK: ~2x faster where int8 dot products exist; the features "
                             "move, parity against the float step)")
    args = parser.parse_args(argv)
    if args.vision_weights == "int8" and args.backend != "xnnpack":
        raise UserError("--vision-weights int8 is an XNNPACK scheme (8da8w); the Core ML delegate keeps float vision")
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415

    if is_hybrid_model(args.model):  # MiniCPM-V 4.6 / 4.7: the state in mutable buffers (export/executorch_hybrid.py)
        from export.executorch_hybrid import export_hybrid  # noqa: PLC0415

        return export_hybrid(args)  # checks the arguments itself (its --max-patches default is the processor's)
    check_export_arguments(args)
    from export.executorch_weights import (  # noqa: PLC0415 (it imports this module)
        VISION_INT8,
        collect,
        install_int8_vision,
        release_weights,
        resident_model,
    )

    dtype = torch.float32
    # Loading and quantising come before the progress bar, so a bad model or a conflicting --quant is one line
    # on stderr (AWQ shows its own progress).
    seconds, memory = {}, {}
    t = time.perf_counter()
    ckpt = Checkpoint.open(args.model)
    resident = resident_model(ckpt, args)
    model, quant, facts = resident.model, resident.quant, resident.facts
    seconds["load + quantise"] = time.perf_counter() - t
    memory["load + quantise"] = memory_note()
    bar = tqdm(total=5, desc="export.executorch", unit="step")
    with MemoryStatus(bar) as status, staged_directory(args.out) as out:
        status("torch.export")
        t = time.perf_counter()
        try:
            methods = build_methods(model, args.max_context, args.prefill_chunk, args.max_patches, args.backend)
        except ValueError as e:
            raise UserError(str(e)) from None
        float_vision = {}
        if args.vision_weights == "int8":  # the float features first: the vision parity is against them
            float_vision = vision_references(methods, model)
            install_int8_vision(*(methods[n].module for n in ("vision_encoder", "video_encoder") if n in methods))
        programs = export_methods(methods, backend=args.backend)
        # Core ML programs build on Linux but load on Apple platforms only: no parity there.
        references = {**parity_references(methods, model, args.max_context, args.prefill_chunk), **float_vision} \
            if args.backend == "xnnpack" else {}
        del float_vision
        specs = _method_specs(methods, model)
        # The exported programs hold the weights now: the eager ones go with them after lowering.
        release_weights(model, *(m.module for m in methods.values()))
        seconds["export"] = time.perf_counter() - t
        memory["export"] = memory_note()
        bar.update()
        status(f"lowering to {args.backend}")
        t = time.perf_counter()
        backend_id = "XnnpackBackend" if args.backend == "xnnpack" else "CoreMLBackend"
        metadata = metadata_methods(ckpt, args.max_context, args.prefill_chunk,
                                    dynamic=methods["text_decoder"].dynamic is not None)
        program, edge = lower_each(programs, args.backend, metadata, dtype)
        delegated = delegation(edge, backend_id)
        for name, size in method_bytes(edge).items():
            delegated[name]["bytes"] = size
        path = out / PROGRAM
        with open(path, "wb") as f:  # from the serialised segments: `program.buffer` would join them in one copy
            program.write_to_file(f)
        del program, edge, programs  # every copy of the weights but the file's: parity has its references
        collect()
        seconds["lower"] = time.perf_counter() - t
        memory["lower"] = memory_note()
        bar.update()
        status("parity")
        t = time.perf_counter()
        errors = parity(path, references) if references else {}
        del references
        seconds["parity"] = time.perf_counter() - t
        memory["parity"] = memory_note()
        bar.update()
        status("embedding table, tokenizer")
        for name, spec in specs.items():
            spec["delegation"] = delegated[name]
        artifacts = {"program": {**file_entry(out, PROGRAM), "format": "pte", "backend": backend_id,
                                 "methods": specs, "constant_methods": metadata},
                     "token_embedding": write_embedding_table(None, out, dtype, resident.table())}
        files = copy_model_files(ckpt, out)
        bar.update()
        status("manifest")
        prefill = "prefill" if "prefill" in methods else "text_decoder"
        steps = {"vision": {"artifact": "program", "function": "vision_encoder"},
                 **({"video": {"artifact": "program", "function": "video_encoder", "frames": VIDEO_FRAME_SLOTS,
                               "batch": 1}} if "video_encoder" in methods else {}),
                 **({"audio": audio_step(model, "program", "audio_encoder")} if "audio_encoder" in methods else {}),
                 "prefill": {"artifact": "program", "function": prefill, "tokens": args.prefill_chunk,
                             # a dynamic text_decoder (XNNPACK) takes the last chunk unpadded
                             **({"min_tokens": 1} if methods[prefill].dynamic else {})},
                 "decode": {"artifact": "program", "function": "text_decoder", "tokens": 1}}
        manifest = build_manifest("executorch", ckpt, args.model, artifacts, files, args, "float32",
                                  errors, quant.manifest(**facts), steps, model=model)
        if args.vision_weights == "int8":
            manifest["quantization"]["vision"] = VISION_INT8
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
    print("memory: " + "; ".join(f"{k}: {v}" for k, v in memory.items()))
    return 0


def _method_specs(methods: dict[str, Method], model: MiniCPMV) -> dict:
    """Input / output names, shapes (a dynamic axis by its name, e.g. "tokens" or "tokens + 4096") and dtypes."""
    h, q, v = model.config.hidden_size, model.config.query_num, model.config.llm.vocab_size
    inputs = {"vision_encoder": VISION_INPUTS, "video_encoder": VISION_INPUTS, "audio_encoder": AUDIO_INPUTS,
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


if __name__ == "__main__":
    run(main)
