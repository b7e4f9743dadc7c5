"""`python -m export.onnx`: the vision step and the LLM step as ONNX graphs, plus the manifest.

Two graphs, shared by every phase of the schedule:
- `vision.onnx`: [batch] fixed-length patch rows -> [batch, query_num, H] (batch is dynamic);
- `llm.onnx`: T new embeddings + the S filled KV cache slots -> last logits + new K/V (T is dynamic: prefill calls
  use T = prefill chunk, decode calls T = 1, so the weights are stored once; S is dynamic, 0..max_context, so a
  step copies and attends over the conversation so far, not the whole cache: `kv_cache.slots = "filled"`);
- MiniCPM-V 4.5 also gets `video.onnx` (`VideoGroupStep`): frame groups of 6 fixed slots (unused slots
  masked) -> one query_num x H output per group through the 3D resampler, groups dynamic. A separate graph,
  so an image never pays for 6 frame slots;
- MiniCPM-o also gets `audio.onnx` (`AudioChunkStep`): one 1 s chunk of mel frames + the encoder cache of the
  clip's earlier chunks -> its audio tokens + the chunk's K/V (fixed shapes; the host keeps the cache).
The token embedding table is a raw file the host indexes. Opset 18, IR 10 (onnxruntime 1.31 reads <= 13).

Memory: `--quant int4-rtn` and `none` read the checkpoint one part at a time (export/onnx_weights.py): the vision
weights while the vision graph is exported, then each LLM Linear quantised alone into its MatMulNBits tensors, so
the peak is one part plus its onnxruntime session (full-size V-4.0, int4 + int8 head: 7.5 GiB RSS for a 7.06 GiB
bf16 checkpoint, was 20.4). AWQ and quantised directories load the whole float32 model. Bytes are the same either way.

int4 (`--quant int4-awq|int4-rtn`, or a quantised checkpoint directory from `python -m quant.awq` as --model):
every quantised Linear of the LLM is one `com.microsoft.MatMulNBits` node holding the records' codes, scales
and zero points bit for bit (see export/matmul_nbits.py), initializers named after the layer
(`llm.model.layers.0.self_attn.q_proj.qweight`, `.scales`, `.qzeros`, `.input_scale`). `--accuracy-level 4`
(default) lets onnxruntime quantise activations to int8 per block on CPU (fast, approximate); 0 computes in
the graph's float type. Parity is measured against the PyTorch step running the same quantised weights.

`--vision-weights int8` (opt-in): the vision-side graphs (vision, video) get int8 weights per output channel and
int8 activations quantised per call (`MatMulInteger` after `DynamicQuantizeLinear`), written by onnxruntime's own
`quantize_dynamic` after the float graph is traced (no hand-written quantiser). CPUs with VNNI / dot-product
instructions run it about 1.8x faster: a full-size V-4.0 slice (SigLIP-400M, 1088 patches, ~1.0 TFLOP) took 6.3 s
in float32 (~165 GFLOP/s) and 3.4 s in int8 on one core here. The features
move (parity against the float torch step is in the manifest, cosine ~0.9996 on random full-size weights), so it is
a choice for the app, not the default.

`--quantize-audio` (MiniCPM-o, opt-in; or a quantised directory from `python -m quant.awq --quantize-audio`): the
Whisper encoder's quantised Linears become MatMulNBits nodes of audio.onnx the same way (initializers
`apm.layers.0.fc1.qweight`, ...), always at accuracy_level 0 (float compute): the encoder runs once per 1 s chunk
(50 rows, not decode's 1), and its tokens then equal the PyTorch step of the same records (parity < 1e-4).
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export import matmul_nbits
from export.bundle import (
    add_export_arguments,
    audio_example,
    build_manifest,
    check_export_arguments,
    copy_model_files,
    file_entry,
    max_abs_error,
    print_summary,
    quiet_loggers,
    staged_directory,
    video_example,
    write_embedding_table,
)
from export.onnx_weights import AUDIO, LLM, VISION, MemoryStatus, open_weights
from export.quantization import QUANT_METHODS, add_quantize_audio_argument, audio_records
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.split import AudioChunkStep, LanguageModelStep, VideoGroupStep, VisionStep
from runtime.cli import run
from runtime.manifest import write_manifest

OPSET = 18
IR_VERSION = 10
VISION_IO = (["pixel_values", "position_ids", "patch_mask", "pos_embed"], ["features"])
LLM_IO = (["inputs_embeds", "position_ids", "attention_mask", "last_index", "past_keys", "past_values"],
          ["logits", "new_keys", "new_values"])
AUDIO_IO = (["mel", "conv_mask", "position_ids", "attention_mask", "past_keys", "past_values"],
            ["tokens", "new_keys", "new_values"])
AUDIO_ACCURACY_LEVEL = 0  # int4 audio encoder: float compute (see the module docstring)
VISION_INT8 = {"weights": "int8 per output channel (symmetric)", "activations": "uint8 per tensor, dynamic",
               "op": "MatMulInteger", "written_by": "onnxruntime.quantization.quantize_dynamic",
               "parity": "against the float torch step"}  # manifest quantization.vision with --vision-weights int8


# the exporter's loggers whose progress chatter our progress bar replaces
LOGGERS = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._dynamo", "onnxscript")


def _export(module: torch.nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]],
            dynamic_shapes: tuple, rename: dict[str, str] | None = None) -> None:
    """Trace `module` to `path` (+ external data); `rename` maps initializer names to the ones to store."""
    import onnx  # noqa: PLC0415

    with warnings.catch_warnings(), quiet_loggers(*LOGGERS):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET, input_names=names[0],
                          output_names=names[1], dynamic_shapes=dynamic_shapes, external_data=True,
                          verbose=False, custom_translation_table=matmul_nbits.TRANSLATION)
    # Only the graph is rewritten: external data stays where it is (initializers keep location and offset).
    model = onnx.load(str(path), load_external_data=False)
    model.ir_version = min(model.ir_version, IR_VERSION)
    if rename:
        matmul_nbits.rename_initializers(model, rename)
    onnx.save(model, str(path))


def quantize_int8(path: Path) -> None:
    """Rewrite the float graph at `path` (+ `.data`) in place with int8 weights per output channel and dynamic int8
    activations: every MatMul / Gemm with a weight becomes MatMulInteger (onnxruntime.quantization.quantize_dynamic;
    see the module docstring). Written beside it under the same file names, then moved over it."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    staged = path.parent / f".int8-{path.stem}"
    staged.mkdir()
    try:
        with warnings.catch_warnings(), quiet_loggers("root"):  # its "consider pre-processing" advice
            warnings.simplefilter("ignore")
            quantize_dynamic(path, staged / path.name, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
        model = onnx.load(str(staged / path.name), load_external_data=False)
        model.ir_version = min(model.ir_version, IR_VERSION)
        onnx.save(model, str(staged / path.name))
        for name in (path.name, f"{path.name}.data"):
            (staged / name).chmod(0o644)  # the library writes its data file private (0600)
            (staged / name).replace(path.parent / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _io_spec(path: Path) -> tuple[list[dict], list[dict]]:
    """Input / output names, shapes (symbolic dims as strings) and dtypes, read back from the graph."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    return spec(graph.input), spec(graph.output)


def _ort_run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def export_vision(model, out: Path, max_patches: int, dtype: torch.dtype, int8: bool = False) -> tuple[dict, float]:
    """Trace the vision step (int8 weights with `int8`), then measure onnxruntime against it on a real image's
    slices."""
    from minicpm.image_processing import process_image  # noqa: PLC0415

    step = VisionStep(model).eval()
    image = np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8)
    slices = process_image(image, model.config.slice)
    inputs = model.vision_inputs(slices.pixel_values[:2], slices.tgt_sizes[:2], pad_to=max_patches)
    args = tuple(inputs[n].to(dtype) if inputs[n].is_floating_point() else inputs[n] for n in VISION_IO[0])
    return _export_batched(step, args, out / "vision.onnx", torch.export.Dim("batch", min=1, max=64), int8)


def export_video(model, out: Path, max_patches: int, dtype: torch.dtype, int8: bool = False) -> tuple[dict, float]:
    """MiniCPM-V 4.5's frame-group graph (`VideoGroupStep`, the 3D resampler): [groups, 6 frame slots, ...] ->
    [groups, query_num, H], groups dynamic; measured against the torch step on two groups."""
    step = VideoGroupStep(model).eval()
    inputs = video_example(model, max_patches)
    args = tuple(inputs[n].to(dtype) if inputs[n].is_floating_point() else inputs[n] for n in VISION_IO[0])
    return _export_batched(step, args, out / "video.onnx", torch.export.Dim("groups", min=1, max=16), int8)


def _export_batched(step: torch.nn.Module, args: tuple, path: Path, batch: torch.export.Dim, int8: bool
                    ) -> tuple[dict, float]:
    """Trace a vision-side step with a dynamic first axis (int8 weights with `int8`); max |error| of onnxruntime
    against the float torch step on `args`."""
    _export(step, args, path, VISION_IO, tuple({0: batch} for _ in args))
    if int8:
        quantize_int8(path)
    with torch.no_grad():
        expected = step(*args).float().numpy()
    got = _ort_run(path, {n: a.numpy() for n, a in zip(VISION_IO[0], args, strict=True)})[0]
    return _artifact(path.parent, path), max_abs_error(got, expected)


def export_audio(model, out: Path, dtype: torch.dtype, records: dict | None = None) -> tuple[dict, float]:
    """MiniCPM-o's audio chunk graph (fixed shapes: one chunk per call); measured against the torch step on the
    three chunks of `audio_example` (first, middle with a cache, short last). `records`: the audio encoder's
    quantised layers already installed as MatMulNBitsLinear (their initializers get the records' names)."""
    step = AudioChunkStep(model).eval()
    examples = [tuple(x[n].to(dtype) if x[n].is_floating_point() else x[n] for n in AUDIO_IO[0])
                for x in audio_example(model)]
    path = out / "audio.onnx"
    _export(step, examples[1], path, AUDIO_IO, tuple(None for _ in AUDIO_IO[0]),
            matmul_nbits.initializer_names(step, model, records or {}))
    error = 0.0
    for args in examples:
        with torch.no_grad():
            expected = [x.float().numpy() for x in step(*args)]
        got = _ort_run(path, {n: a.numpy() for n, a in zip(AUDIO_IO[0], args, strict=True)})
        error = max(error, *(max_abs_error(g, e) for g, e in zip(got, expected, strict=True)))
    return _artifact(out, path), error


def export_llm(model, out: Path, max_context: int, chunk: int, dtype: torch.dtype,
               records: dict | None = None) -> tuple[dict, float]:
    """Trace the LLM step with a dynamic token count; measure onnxruntime at T = chunk and T = 1. `records`:
    the quantised layers already installed as MatMulNBitsLinear (their initializers get the records' names)."""
    step = LanguageModelStep(model, max_context).eval()
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def example(tokens: int, past: int, slots: int):
        shape = (len(step.layers), step.kv_heads, slots, step.head_dim)
        mask = torch.full((1, 1, tokens, slots + tokens), -1e30)
        mask[..., :past] = 0
        mask[..., slots:] = torch.triu(torch.full((tokens, tokens), -1e30), 1)
        return (torch.randn(1, tokens, hidden, generator=gen).to(dtype), torch.arange(past, past + tokens)[None],
                mask.to(dtype), torch.tensor([tokens - 1]), torch.randn(shape, generator=gen).to(dtype),
                torch.randn(shape, generator=gen).to(dtype))

    # The cache axis is dynamic too: the host passes only the filled slots (manifest kv_cache.slots = "filled"),
    # so each step copies and attends over the conversation so far, not all max_context slots.
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    slots = torch.export.Dim("slots", min=0, max=max_context)
    path = out / "llm.onnx"
    trace_tokens = max(2, min(chunk, 8))  # length-1 examples get specialised
    _export(step, example(trace_tokens, 3, 5), path, LLM_IO,
            ({1: tokens}, {1: tokens}, {2: tokens, 3: torch.export.Dim.DYNAMIC}, None, {2: slots}, {2: slots}),
            matmul_nbits.initializer_names(step, model, records or {}))
    error = 0.0
    for t, past, filled in ((chunk, 0, 0), (chunk, 5, 5), (1, max_context - 1, max_context - 1), (1, 3, max_context)):
        args = example(t, past, filled)
        with torch.no_grad():
            expected = [x.float().numpy() for x in step(*args)]
        got = _ort_run(path, {n: a.numpy() for n, a in zip(LLM_IO[0], args, strict=True)})
        error = max(error, *(max_abs_error(g, e) for g, e in zip(got, expected, strict=True)))
    return _artifact(out, path), error


def _artifact(out: Path, path: Path) -> dict:
    inputs, outputs = _io_spec(path)
    return {**file_entry(out, path.name), "format": "onnx", "inputs": inputs, "outputs": outputs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph and weight precision")
    parser.add_argument("--quant", choices=QUANT_METHODS,
                        help="LLM weights: int4 AWQ (built-in calibration set, or --calib), int4 round-to-nearest, "
                             "or none (default). A quantised checkpoint directory (python -m quant.awq) as --model "
                             "brings its own records (default: use them)")
    add_quantize_audio_argument(parser)
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), help="input channels per int4 group (128)")
    parser.add_argument("--symmetric", action="store_true", help="int4 without zero points (zero point 8)")
    parser.add_argument("--lm-head", choices=("keep", "int8"),
                        help="output head: float (keep, default) or per-row int8 (MatMulNBits bits=8)")
    parser.add_argument("--samples", type=int, default=32, help="AWQ calibration samples (default 32)")
    parser.add_argument("--calib", help="AWQ calibration JSONL (default: the built-in offline set)")
    parser.add_argument("--accuracy-level", type=int, choices=matmul_nbits.ACCURACY_LEVELS, default=4,
                        help="MatMulNBits compute: 4 = int8 activations on CPU (default, fast), 0 = the graph's "
                             "float type")
    parser.add_argument("--vision-weights", choices=("float", "int8"), default="float",
                        help="vision-side graphs: float (default) or int8 weights with dynamic int8 activations "
                             "(~1.8x faster on CPUs with VNNI / dot-product instructions; parity in the manifest)")
    args = parser.parse_args(argv)
    if args.vision_weights == "int8" and args.dtype != "fp32":  # quantize_dynamic reads float32 weights
        raise UserError("--vision-weights int8 applies to --dtype fp32 graphs")
    from export.onnx_hybrid import export_hybrid, is_hybrid_model  # noqa: PLC0415

    if is_hybrid_model(args.model):  # MiniCPM-V 4.6 / 4.7: the LLM step with per-layer state (export/onnx_hybrid.py)
        return export_hybrid(args)  # checks the arguments once its --max-patches default is known
    check_export_arguments(args)
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.symmetric and args.quant == "none":
        raise UserError("--symmetric applies to int4 quantisation, not --quant none")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    int8_vision = args.vision_weights == "int8"
    # Opening and quantising come before the progress bar, so a bad model or a conflicting --quant is one line
    # on stderr (AWQ shows its own progress). RTN and float exports read each part when its graph is exported.
    ckpt = Checkpoint.open(args.model)
    weights = open_weights(ckpt, args, dtype, AUDIO_ACCURACY_LEVEL)
    model, records, quant = weights.model, weights.records, weights.quant
    steps = tqdm(total=4, desc="export.onnx", unit="step")
    rows, parity, artifacts = [], {}, {}
    with MemoryStatus(steps) as status, staged_directory(args.out) as out:
        t = time.perf_counter()
        status("vision graph")
        with weights.part(VISION):
            artifacts["vision"], parity["vision"] = export_vision(model, out, args.max_patches, dtype, int8_vision)
            rows.append(("vision.onnx (+ .data)", _size(out, "vision.onnx"), parity["vision"],
                         time.perf_counter() - t))
            if model.resampler.temporal:  # MiniCPM-V 4.5: frame groups through the 3D resampler
                t = time.perf_counter()
                status("video graph")
                artifacts["video"], parity["video"] = export_video(model, out, args.max_patches, dtype, int8_vision)
                rows.append(("video.onnx (+ .data)", _size(out, "video.onnx"), parity["video"],
                             time.perf_counter() - t))
        if hasattr(model, "apm"):  # MiniCPM-o: the audio encoder, one 1 s chunk per call
            t = time.perf_counter()
            status("audio graph")
            with weights.part(AUDIO):
                artifacts["audio"], parity["audio"] = export_audio(model, out, dtype, audio_records(records))
            rows.append(("audio.onnx (+ .data)", _size(out, "audio.onnx"), parity["audio"], time.perf_counter() - t))
        steps.update()
        t = time.perf_counter()
        status("llm graph")
        try:
            with weights.part(LLM):
                artifacts["llm"], parity["llm"] = export_llm(model, out, args.max_context, args.prefill_chunk, dtype,
                                                             records)
        except ValueError as e:
            raise UserError(str(e)) from None
        rows.append(("llm.onnx (+ .data)", _size(out, "llm.onnx"), parity["llm"], time.perf_counter() - t))
        steps.update()
        status("embedding table, tokenizer")
        t = time.perf_counter()
        artifacts["token_embedding"] = write_embedding_table(None, out, dtype, weights.embedding_table())
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out)
        files += [file_entry(out, p.name) for p in sorted(out.glob("*.onnx.data"))]
        steps.update()
        status("manifest")
        entry = quant.manifest()
        if records:
            entry.update(format="com.microsoft MatMulNBits: the records' codes, scales and zero points",
                         accuracy_level=args.accuracy_level,
                         **({"audio_accuracy_level": AUDIO_ACCURACY_LEVEL} if quant.audio_layers else {}))
        if int8_vision:
            entry["vision"] = VISION_INT8
        manifest = build_manifest("onnx", ckpt, args.model, artifacts, files, args,
                                  "float16" if args.dtype == "fp16" else "float32", parity, entry, model=model)
        manifest["schedule"]["kv_cache"]["slots"] = "filled"  # past_keys / past_values carry the filled slots only
        manifest["schedule"]["steps"]["prefill"]["min_tokens"] = 1  # T is dynamic: the last chunk is not padded
        write_manifest(out, manifest)
        steps.update()
    steps.close()
    print_summary(f"ONNX export of {ckpt.config.variant.name} -> {args.out}", rows)
    print(quant.describe() + (f", MatMulNBits accuracy_level {args.accuracy_level}" if records else "")
          + ("; vision int8 (MatMulInteger)" if int8_vision else ""))
    for note in quant.notes:
        print(f"note: {note}")
    return 0


def _size(out: Path, name: str) -> int:
    return sum(p.stat().st_size for p in out.glob(f"{name}*"))


if __name__ == "__main__":
    run(main)
