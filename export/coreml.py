"""`python -m export.coreml`: the vision step, the LLM (and MiniCPM-o's audio step) as Core ML packages, plus
the manifest.

    python -m export.coreml --model M --out DIR [--quant int4-awq|int4-rtn|none] [--group-size G]
        [--prefill-chunk N] [--max-context N] [--precision fp16|fp32] [--lm-head int8|fp16]
        [--compute-units all|cpu_only|cpu_and_gpu|cpu_and_ne] [--target iOS18|macOS15] [--ane-vision]

MiniCPM-V 4.6 / 4.7 (hybrid checkpoints) are exported by export/coreml_hybrid.py (vision step, LLM step with its
per-layer state as Core ML state); what follows describes the older models' packages.

Packages (ML programs for iOS 18 / macOS 15; they convert on Linux, run only on Apple platforms):
- `vision.mlpackage`: one slice per call, the ONNX vision graph's inputs at batch 1: pixel_values
  [1,3,p,P*p], position_ids [1,P] int32 (host NaViT ids), patch_mask [1,P], pos_embed [1,P,H] ->
  features [1,query_num,H]. MiniCPM-V 4.5: a second function `video`, one frame group per call ([1,6,...]
  inputs, unused slots with patch mask 0) through the 3D resampler, sharing the weights. Vision weights are
  never quantised (fp16 by default). `--ane-vision` marks the
  Neural Engine variant: fp16 only (refused with --precision fp32), static batch-1 shapes, loaded with cpu_and_ne.
  A package stores no compute-unit preference: the manifest's schedule.coreml.compute_units tells the runtime.
- `llm.mlpackage`: ONE package, two functions sharing one copy of the weights (multifunction):
  `prefill` (T = prefill chunk) and `decode` (T = 1). Inputs inputs_embeds [1,T,H], position_ids [1,T] int32,
  attention_mask [1,1,T,C+T] (the ONNX graph's additive mask: C cache slots, then the T new tokens),
  last_index [1] int32 -> logits [1,V] of that row. The KV cache is Core ML state: `k_cache_{i}` /
  `v_cache_{i}` per layer, [1, kv_heads, C + S, head_dim] float16 (S = prefill chunk), shared by both
  functions through one `make_state()`.
- `audio.mlpackage` (MiniCPM-o): one 1 s chunk per call, the ONNX audio graph's inputs without the cache: mel
  [1,80,2C+3], conv_mask [1,2C+1], position_ids [C] int32, attention_mask [1,1,C,P+C] -> tokens [C/pool,H]
  (C = 50 encoder frames, P = 1500 positions). The encoder cache is state: `k_cache_{i}` / `v_cache_{i}` per
  encoder layer, [1, heads, P, head_dim] float16, the chunk's K/V written at slots position_ids[0] + [0, C) and
  the mask's C new columns moved there, as for the LLM. Stale slots of an earlier clip are masked, so one
  `make_state()` serves every clip. Float weights, fp16 compute; with `--quantize-audio` (opt-in) the Whisper
  blocks' int4 records as for the LLM (below). Core ML states are float16 only, so its parity is measured with
  that state and, as `parity.audio_fp32_state`, with the same graph's float32 state.

Write position. The T new K/V go to slots position_ids[0,0] + [0, T): the first new position is the number
of filled slots (runtime/session.py keeps slot == position), so no extra input is needed and the host builds
exactly the mask it builds for ONNX and ExecuTorch. Inside the graph the write is a `slice_update` with that
dynamic begin (torch.export `.item()` + `slice_scatter`: slice assignment converts, `index_copy_` does not), and
the mask is moved onto the state: columns [0, C) as given, the new tokens' columns at their slots, the S slack
slots masked. The slack takes the padded rows of a last prefill chunk near the end of the context, so every
write stays in bounds and all shapes are static (no flexible shapes: states cannot have them, and GPU / ANE
compile static shapes only). Masked slots contribute exact zeros: a fresh `make_state()` (zeros) per
conversation is all the reset there is.

Weights. int4 records from quant/ (AWQ by default) are written bit for bit (export/coreml_weights.py): each
quantised Linear becomes a `BlockwiseLinear` holding the record's codes, which the converter writes as
`constexpr_blockwise_shift_scale(data=codes, scale, offset=zeros)` (uint4; uint8 for the `--lm-head int8` per-row
records). `--quant int4-rtn` or `none` on a checkpoint streams it: each Linear is read alone and installed as its
codes, so no float copy of the LLM is held (a full-size model exports within memory). RMSNorm (variance, rsqrt)
stays float32 inside fp16 programs: Qwen3 activations reach 15k-30k and their squares overflow fp16. The torch
modules are traced in float32 (coremltools' torch frontend expects float32 and casts to fp16 itself).

The token embedding table is `token_embedding.bin` (raw [V,H]), gathered on the host: a lookup is a memcpy,
and upstream scales prompt text embeddings by `scale_emb` but generated tokens not, which the host applies
(schedule.prompt_embedding_scale / generated_embedding_scale). An `.mlpackage` is a directory: its manifest
sha256 is `runtime.manifest.sha256_tree` (one line per file, sorted paths, file digests).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.bundle import (
    VIDEO_FRAME_SLOTS,
    add_export_arguments,
    audio_example,
    audio_step,
    build_manifest,
    check_export_arguments,
    copy_model_files,
    max_abs_error,
    print_summary,
    staged_directory,
    video_example,
    vision_example,
    write_embedding_table,
)
from export.coreml_merge import merge_packages
from export.coreml_package import (
    GENERATOR,
    convert,
    describe,
    export_program,
    import_coremltools,
    np_float,
    package_entry,
    peak_rss_mb,
    publish_package,
    quiet_converter,
    save_llm_function,
    save_package,
    tag_fp32,
    tree_size,
)
from export.coreml_weights import install_records, open_weights
from export.onnx_weights import AUDIO, LLM, VISION, MemoryStatus, memory_note
from export.quantization import QUANT_METHODS, add_quantize_audio_argument
from export.stateful_audio import AUDIO_INPUTS, StatefulAudioEncoder, audio_state
from ios_bridge.bundle import write_readme
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep, LanguageModelStep, VideoGroupStep, VisionStep
from runtime.cli import run
from runtime.manifest import write_manifest

VISION_INPUTS = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
LLM_INPUTS = ("inputs_embeds", "position_ids", "attention_mask", "last_index")
FUNCTIONS = ("prefill", "decode")
COMPRESSION = {"format": "constexpr_blockwise_shift_scale: the records' codes, float16 scales and zero points"}
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
TARGETS = ("iOS18", "macOS15")  # the first targets with states and constexpr_blockwise_shift_scale
MASK_FILL = -65504.0  # slack columns: the most negative fp16 (finite; exact zero weight after softmax)


# ---------------------------------------------------------------------------------------------------------
# The modules handed to the converter
# ---------------------------------------------------------------------------------------------------------


class StatefulLanguageModel(nn.Module):
    """`LanguageModelStep` with the KV cache in fp16 buffers that become Core ML states (see the module docstring).

    inputs_embeds [1,T,H], position_ids [1,T] int64, attention_mask [1,1,T,C+T] additive, last_index [1] int64
    -> logits [1,V]. The same module is exported at T = prefill chunk and T = 1; run eagerly it is the exact
    PyTorch reference of both functions (one set of buffers, as one `make_state()` on device).
    """

    def __init__(self, model: MiniCPMV, max_context: int, slack: int):
        super().__init__()
        self.step = LanguageModelStep(model, max_context).eval()
        self.max_context, self.slack = max_context, slack
        self.layers = len(self.step.layers)
        shape = (1, self.step.kv_heads, max_context + slack, self.step.head_dim)
        for i in range(self.layers):  # one state per layer and tensor: each write touches only its own buffer
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=torch.float16), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=torch.float16), persistent=False)

    @property
    def state_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in range(self.layers) for kind in ("k", "v")]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor) -> torch.Tensor:
        tokens = inputs_embeds.shape[1]
        slots = self.max_context + self.slack
        start = position_ids[0, 0].item()
        torch._check(start >= 0)
        torch._check(start <= slots - tokens)
        # The host's keys are [C cache slots | T new tokens]; the state's are [C slots | slack], with the new
        # tokens written at their slots, so their mask columns move there (slack columns stay masked).
        mask = torch.cat([attention_mask[..., : self.max_context],
                          torch.full((1, 1, tokens, self.slack), MASK_FILL, dtype=attention_mask.dtype)], dim=-1)
        mask = torch.slice_scatter(mask, attention_mask[..., self.max_context:], dim=3, start=start,
                                   end=start + tokens)

        def attend_over(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            # slice_scatter + copy_ exports as read_state -> slice_update(begin = start) -> coreml_update_state
            # with static shapes (a slice assignment would broadcast into a dynamically shaped slice).
            keys.copy_(torch.slice_scatter(keys, k.to(keys.dtype), dim=2, start=start, end=start + tokens))
            values.copy_(torch.slice_scatter(values, v.to(values.dtype), dim=2, start=start, end=start + tokens))
            return keys.to(k.dtype), values.to(v.dtype)

        return self.step.run_layers(inputs_embeds, position_ids, mask, last_index, attend_over)

    def reset(self) -> None:
        """Empty the cache (what a fresh `make_state()` is on device)."""
        for name in self.state_names:
            getattr(self, name).zero_()


def language_model(model: MiniCPMV, max_context: int, chunk: int) -> StatefulLanguageModel:
    """The LLM module the converter gets: the model's float32 weights and installed records (load_model), fp16
    state buffers. The weights are shared, not copied."""
    try:
        return StatefulLanguageModel(model, max_context, chunk).eval()
    except ValueError as e:  # e.g. a context beyond the rope table's original length
        raise UserError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# Conversion, one function at a time (the converter and package helpers: export/coreml_package.py)
# ---------------------------------------------------------------------------------------------------------


# ----- vision ----------------------------------------------------------------------------------------------


def vision_tensor_types(ct, args: argparse.Namespace, hidden: int, patch: int, frames: int | None = None) -> list:
    """Inputs of the vision package at batch 1; `frames`: the video function's frame-slot axis."""
    floating, lead = np_float(args), (1,) if frames is None else (1, frames)
    return [ct.TensorType(name="pixel_values", shape=(*lead, 3, patch, args.max_patches * patch), dtype=floating),
            ct.TensorType(name="position_ids", shape=(*lead, args.max_patches), dtype=np.int32),
            ct.TensorType(name="patch_mask", shape=(*lead, args.max_patches), dtype=floating),
            ct.TensorType(name="pos_embed", shape=(*lead, args.max_patches, hidden), dtype=floating)]


@torch.no_grad()
def convert_vision_function(ct, step: nn.Module, examples: list[dict], inputs: list, args: argparse.Namespace,
                            what: str) -> tuple[object, float]:
    """torch.export + convert one vision-side function; the max |error| of the exported program against the
    eager step on every example."""
    program = export_program(step, tuple(examples[0][n] for n in VISION_INPUTS))
    traced = program.module()
    error = max(max_abs_error(traced(*(e[n] for n in VISION_INPUTS)), step(*(e[n] for n in VISION_INPUTS)))
                for e in examples)
    del traced
    mlmodel = convert(ct, program, inputs, [ct.TensorType(name="features", dtype=np_float(args))], args,
                      fp32_ops=False, what=what)
    return mlmodel, error


def export_vision(ct, model: MiniCPMV, out: Path, args: argparse.Namespace, metadata: dict) -> tuple[Path, dict]:
    """vision.mlpackage; returns its path and the max |error| of each exported program against its eager step.
    MiniCPM-V 4.5 adds the `video` function (one frame group of 6 slots through the 3D resampler) to the same
    package: a second function with its own static shapes, the vision weights stored once."""
    p, hidden = model.config.slice.patch_size, model.config.hidden_size
    errors = {}
    mlmodel, errors["vision"] = convert_vision_function(
        ct, VisionStep(model).eval(), vision_example(model, args.max_patches),
        vision_tensor_types(ct, args, hidden, p), args, "vision step")
    path = out / "vision.mlpackage"
    facts = {**metadata, "max_patches": args.max_patches, "ane_variant": args.ane_vision}
    if not model.resampler.temporal:
        save_package(mlmodel, path, "MiniCPM-V vision: one slice (patch row) -> query_num x H features",
              {**facts, "function": "vision"})
        return path, errors
    parts = out / ".vision-functions"
    parts.mkdir()
    with quiet_converter():
        mlmodel.save(str(parts / "main.mlpackage"))
    del mlmodel
    groups = video_example(model, args.max_patches)
    examples = [{n: groups[n][i:i + 1] for n in VISION_INPUTS} for i in range(len(groups["pixel_values"]))]
    mlmodel, errors["video"] = convert_vision_function(
        ct, VideoGroupStep(model).eval(), examples, vision_tensor_types(ct, args, hidden, p, VIDEO_FRAME_SLOTS),
        args, "video step")
    with quiet_converter():
        mlmodel.save(str(parts / "video.mlpackage"))
    del mlmodel
    merge_functions(ct, {"main": parts / "main.mlpackage", "video": parts / "video.mlpackage"}, path, "main",
                    "MiniCPM-V vision: functions main (one slice -> query_num x H features) and video (one group "
                    f"of {VIDEO_FRAME_SLOTS} frame slots -> query_num x H)",
                    {**facts, "functions": "main,video", "frames_per_group": VIDEO_FRAME_SLOTS})
    shutil.rmtree(parts)
    return path, errors


# ----- LLM -------------------------------------------------------------------------------------------------


def schedule_inputs(embeds: np.ndarray, past: int, width: int, max_context: int) -> dict[str, torch.Tensor]:
    """The inputs runtime/session.py gives one LLM call: `len(embeds)` new tokens after `past` filled slots,
    padded to `width` rows (mask: the filled slots, then the new tokens causally; pad rows see only new rows)."""
    n, hidden = embeds.shape
    neg = np.float32(-1e30)
    x = np.zeros((1, width, hidden), dtype=np.float32)
    x[0, :n] = embeds
    positions = np.minimum(np.arange(past, past + width), max_context - 1).astype(np.int64)[None]
    mask = np.full((1, 1, width, max_context + width), neg, dtype=np.float32)
    mask[0, 0, :n, :past] = 0.0
    mask[0, 0, :, max_context:] = np.triu(np.full((width, width), neg, dtype=np.float32), 1)
    return {"inputs_embeds": torch.from_numpy(x), "position_ids": torch.from_numpy(positions),
            "attention_mask": torch.from_numpy(mask), "last_index": torch.tensor([n - 1])}


def parity_calls(max_context: int, chunk: int) -> list[tuple[int, int | None, int]]:
    """(new tokens, start slot or None = continue, width): a full prefill chunk, two decode steps, and a last
    padded chunk near the end of the context whose pad rows run into the slack."""
    tail = max(1, min(chunk, max_context - 2) - 2)
    return [(min(chunk, max_context - 1), 0, chunk), (1, None, 1), (1, None, 1), (tail, max_context - tail, chunk)]


@torch.no_grad()
def reference_logits(model: MiniCPMV, max_context: int, chunk: int, seed: int = 0) -> list[torch.Tensor]:
    """`LanguageModelStep` (the eager split, host-held float32 cache) over `parity_calls`."""
    step = LanguageModelStep(model, max_context).eval()
    shape = (len(step.layers), step.kv_heads, max_context, step.head_dim)
    keys, values = torch.zeros(shape), torch.zeros(shape)
    out = []
    for inputs, n, past in _calls(model.config.hidden_size, max_context, chunk, seed):
        logits, new_keys, new_values = step(**inputs, past_keys=keys, past_values=values)
        keys[:, :, past:past + n] = new_keys[:, :, :n]
        values[:, :, past:past + n] = new_values[:, :, :n]
        out.append(logits)
    return out


@torch.no_grad()
def wrapper_error(wrapper: StatefulLanguageModel, hidden: int, expected: list[torch.Tensor], seed: int = 0) -> float:
    """Max |logit difference| of the stateful module against `reference_logits` (same calls, same data)."""
    wrapper.reset()
    error = 0.0
    for (inputs, _, _), ref in zip(_calls(hidden, wrapper.max_context, wrapper.slack, seed), expected, strict=True):
        error = max(error, max_abs_error(wrapper(**inputs), ref))
    wrapper.reset()
    return error


def _calls(hidden: int, max_context: int, chunk: int, seed: int):
    rng = np.random.RandomState(seed)
    past = 0
    for n, start, width in parity_calls(max_context, chunk):
        past = past if start is None else start
        yield schedule_inputs(rng.randn(n, hidden).astype(np.float32), past, width, max_context), n, past
        past += n


def llm_example(wrapper: StatefulLanguageModel, tokens: int) -> tuple[torch.Tensor, ...]:
    hidden = wrapper.step.norm.weight.shape[0]
    inputs = schedule_inputs(np.zeros((tokens, hidden), dtype=np.float32), 0, tokens, wrapper.max_context)
    return tuple(inputs[n] for n in LLM_INPUTS)


def export_llm_functions(ct, wrapper: StatefulLanguageModel, parts: Path, args: argparse.Namespace,
                         progress: tqdm, status: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Convert the prefill and decode functions one at a time into single-function packages in `parts`
    (`status`: what the progress bar says, default its postfix)."""
    status = status or progress.set_postfix_str
    floating = np_float(args)
    hidden, context = wrapper.step.norm.weight.shape[0], wrapper.max_context
    paths = {}
    for name, tokens in (("prefill", args.prefill_chunk), ("decode", 1)):
        status(f"llm {name} (T={tokens}): torch.export")
        program = export_program(wrapper, llm_example(wrapper, tokens))
        if args.precision == "fp16" and not tag_fp32(program):
            raise UserError("found no RMSNorm modules to keep in float32 (unexpected LLM layout)")
        inputs = [ct.TensorType(name="inputs_embeds", shape=(1, tokens, hidden), dtype=floating),
                  ct.TensorType(name="position_ids", shape=(1, tokens), dtype=np.int32),
                  ct.TensorType(name="attention_mask", shape=(1, 1, tokens, context + tokens), dtype=floating),
                  ct.TensorType(name="last_index", shape=(1,), dtype=np.int32)]
        status(f"llm {name} (T={tokens}): converting")
        paths[name] = save_llm_function(ct, program, inputs, args, parts / f"{name}.mlpackage")
        del program
        gc.collect()
        progress.update()
    return paths


# ----- audio (MiniCPM-o) -----------------------------------------------------------------------------------


def audio_tensor_types(ct, args: argparse.Namespace, wrapper: StatefulAudioEncoder, n_mels: int) -> list:
    floating, frames = np_float(args), wrapper.chunk
    return [ct.TensorType(name="mel", shape=(1, n_mels, 2 * frames + 3), dtype=floating),
            ct.TensorType(name="conv_mask", shape=(1, 2 * frames + 1), dtype=floating),
            ct.TensorType(name="position_ids", shape=(frames,), dtype=np.int32),
            ct.TensorType(name="attention_mask", shape=(1, 1, frames, wrapper.positions + frames), dtype=floating)]


@torch.no_grad()
def chunks_error(module: nn.Module, examples: list[dict], expected: list[torch.Tensor]) -> float:
    """Max |token difference| of a stateful audio module fed `examples` in order (its state carries the cache)
    against the stateless step's tokens."""
    return max(max_abs_error(module(*(e[n] for n in AUDIO_INPUTS)), ref) for e, ref in zip(examples, expected,
                                                                                             strict=True))


@torch.no_grad()
def export_audio(ct, model: MiniCPMV, out: Path, args: argparse.Namespace, metadata: dict,
                 records: dict | None = None) -> tuple[Path, dict]:
    """audio.mlpackage; returns its path and the errors over the three chunks of `audio_example` against the
    stateless `AudioChunkStep` with its host float32 cache: the exported program (float16 state, what is
    converted) as "audio", the same graph with float32 state as "audio_fp32_state". `records`: the audio
    encoder's, installed as their codes first (load_model has installed them already in an export)."""
    if records:
        install_records(model, records, half=args.precision == "fp16")
    step = AudioChunkStep(model).eval()
    examples = audio_example(model)
    expected = [step(**e)[0] for e in examples]
    wrapper = StatefulAudioEncoder(step, torch.float16, write="slice")  # Core ML states are float16 only
    program = export_program(wrapper, tuple(examples[0][n] for n in AUDIO_INPUTS))
    errors = {"audio": chunks_error(program.module(), examples, expected),
              "audio_fp32_state": chunks_error(StatefulAudioEncoder(step, torch.float32, write="slice"), examples,
                                                  expected)}
    wrapper.reset()  # the program's module writes the wrapper's buffers
    mlmodel = convert(ct, program, audio_tensor_types(ct, args, wrapper, model.apm.num_mel_bins),
                      [ct.TensorType(name="tokens", dtype=np_float(args))], args, fp32_ops=False, what="audio step")
    del program
    path = out / "audio.mlpackage"
    save_package(mlmodel, path, f"MiniCPM-o audio: one 1 s chunk ({wrapper.chunk} encoder frames) -> "
          f"{wrapper.chunk // step.pool} tokens, encoder cache as state",
          {**metadata, "function": "audio", "chunk_frames": wrapper.chunk, "state_slots": wrapper.positions,
           "states": "k_cache_{layer}, v_cache_{layer}"})
    return path, errors


def coreml_audio_state(model: MiniCPMV) -> dict:
    """`schedule.coreml.audio_state`: the audio package's float16 states (export.stateful_audio)."""
    return audio_state(model, "float16", "none needed: slots of earlier clips are masked; a fresh make_state() per "
                                         "backend")


def merge_functions(ct, parts: dict[str, Path], path: Path, default: str, description: str, metadata: dict) -> None:
    """One multifunction package, the functions' common weights stored once (export/coreml_merge.py: without
    loading them, unlike coremltools' save_multifunction)."""
    merge_packages(parts, path, default)
    # Metadata goes into the package's spec file directly: reloading and saving would rewrite the weights.
    from coremltools.libmodelpackage import ModelPackage  # noqa: PLC0415

    spec_path = Path(ModelPackage(str(path)).getRootModel().path())
    spec = ct.utils.load_spec(str(path))
    describe(spec, description, metadata)
    spec_path.write_bytes(spec.SerializeToString())
    publish_package(path)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.coreml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--quant", choices=QUANT_METHODS,
                        help="LLM weights: int4 AWQ (default; built-in calibration set), int4 round-to-nearest, or "
                             "none. A quantised checkpoint directory (python -m quant.awq) brings its own records.")
    add_quantize_audio_argument(parser)
    parser.add_argument("--group-size", type=int, help="input channels per int4 group: 32, 64 or 128 (default 128)")
    parser.add_argument("--lm-head", choices=("int8", "keep"),
                        help="output head: per-row int8 (default when quantising) or float (keep; default with --quant "
                             "none)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                        help="weights and compute (RMSNorm stays fp32 either way; the KV state is always fp16)")
    parser.add_argument("--compute-units", choices=COMPUTE_UNITS, default="all",
                        help="Core ML compute units the runtime should load the packages with (default all)")
    parser.add_argument("--target", choices=TARGETS, default="iOS18", help="minimum deployment target (iOS18)")
    parser.add_argument("--ane-vision", action="store_true",
                        help="vision package for the Neural Engine: fp16 only, static batch-1 shapes, loaded with "
                             "cpu_and_ne (the LLM keeps --compute-units)")
    parser.add_argument("--calib", help="AWQ calibration JSONL (default: the built-in offline set)")
    parser.add_argument("--samples", type=int, default=64, help="AWQ calibration samples (default 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per AWQ calibration sample (default 512)")
    args = parser.parse_args(argv)
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415

    args.hybrid = is_hybrid_model(args.model)
    if not args.hybrid:  # the hybrid exporter checks them once its --max-patches default is known
        check_export_arguments(args)
    if args.ane_vision and args.precision != "fp16":
        raise UserError("--ane-vision needs --precision fp16 (the Neural Engine computes in fp16 only)")
    if args.group_size is not None and args.group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, got {args.group_size}")
    if args.samples < 1 or args.seq_len < 8:
        raise UserError("--samples must be >= 1 and --seq-len >= 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hybrid:  # MiniCPM-V 4.6 / 4.7: vision step, LLM step with its state as Core ML state
        from export.coreml_hybrid import export_hybrid  # noqa: PLC0415

        return export_hybrid(args)
    ct = import_coremltools()
    progress = tqdm(total=9, desc="export.coreml", unit="step")
    progress.set_postfix_str("loading checkpoint, quantising" if args.quant != "none" else "loading checkpoint")
    ckpt = Checkpoint.open(args.model)
    weights = open_weights(ckpt, args)  # records installed as their codes (a streamed model: part by part)
    model, quant = weights.model, weights.quant
    progress.update()
    dtype_name = "float16" if args.precision == "fp16" else "float32"
    slots = args.max_context + args.prefill_chunk
    metadata = {"generator": GENERATOR, "model": args.model, "variant": ckpt.config.variant.name,
                "precision": args.precision, "target": args.target, "quantization": quant.method,
                "group_size": quant.group_size or "-", "lm_head": quant.lm_head}
    rows, parity, artifacts, memory = [], {}, {}, {"load": memory_note()}
    with MemoryStatus(progress) as status, staged_directory(args.out) as out:
        t = time.perf_counter()
        status("vision package")
        with weights.part(VISION):
            vision, errors = export_vision(ct, model, out, args, metadata)
        parity.update(errors)
        rows.append(("vision.mlpackage" + (" (+video)" if "video" in errors else ""), tree_size(vision),
                     max(errors.values()), time.perf_counter() - t))
        # build_manifest reads the patch grid from the model; keep that fact only (a loaded model's vision weights
        # go before the LLM is traced).
        del model.vpm, model.resampler
        gc.collect()
        memory["vision"] = memory_note()
        progress.update()

        if hasattr(model, "apm"):  # MiniCPM-o: the audio encoder, one 1 s chunk per call
            t = time.perf_counter()
            status("audio package")
            with weights.part(AUDIO):
                audio, errors = export_audio(ct, model, out, args, metadata)
            parity.update(errors)
            rows.append(("audio.mlpackage", tree_size(audio), errors["audio"], time.perf_counter() - t))
            memory["audio"] = memory_note()
        progress.update()

        status("embedding table, tokenizer")
        t = time.perf_counter()
        table_dtype = torch.float16 if args.precision == "fp16" else torch.float32
        artifacts["token_embedding"] = write_embedding_table(None, out, table_dtype, weights.embedding_table())
        artifacts["token_embedding"]["note"] = (
            "gathered by the host (a lookup is a memcpy); prompt rows times schedule.prompt_embedding_scale, "
            "generated rows times schedule.generated_embedding_scale (upstream scales prompt text only)")
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out)
        progress.update()

        t = time.perf_counter()
        status("llm: eager reference")
        parts_dir = out / ".functions"
        parts_dir.mkdir()
        with weights.part(LLM):
            expected = reference_logits(model, args.max_context, args.prefill_chunk)
            wrapper = language_model(model, args.max_context, args.prefill_chunk)
            parity["llm"] = wrapper_error(wrapper, ckpt.config.hidden_size, expected)
            del expected
            state_shape = list(wrapper.k_cache_0.shape)
            layers, state_names = wrapper.layers, wrapper.state_names
            progress.update()
            parts = export_llm_functions(ct, wrapper, parts_dir, args, progress, status)
            del wrapper  # (it holds the head) the part's weights go when the block ends
        # Both functions are on disk: release the LLM weights before the merge loads the two programs (the
        # model object stays for the manifest's audio facts).
        del model.llm
        gc.collect()
        memory["llm functions"] = memory_note()
        status("llm: multifunction package")
        llm = out / "llm.mlpackage"
        merge_functions(ct, parts, llm, "decode", "MiniCPM-V LLM: functions prefill (T = prefill chunk) and decode "
                        "(T = 1), KV cache as state", {**metadata, "functions": "prefill,decode",
                                         "prefill_chunk": args.prefill_chunk, "max_context": args.max_context,
                                         "state_slots": slots, "states": "k_cache_{layer}, v_cache_{layer}"})
        shutil.rmtree(parts_dir)
        memory["merge"] = memory_note()
        rows.append(("llm.mlpackage (prefill+decode)", tree_size(llm), parity["llm"], time.perf_counter() - t))
        progress.update()

        status("manifest")
        artifacts["vision"] = package_entry(out, vision)
        artifacts["llm"] = package_entry(out, llm)
        if "audio" in parity:
            artifacts["audio"] = package_entry(out, audio)
        steps = {"vision": {"artifact": "vision", "function": "main", "batch": 1},
                 **({"video": {"artifact": "vision", "function": "video", "frames": VIDEO_FRAME_SLOTS, "batch": 1}}
                    if "video" in parity else {}),
                 "prefill": {"artifact": "llm", "function": "prefill", "tokens": args.prefill_chunk},
                 "decode": {"artifact": "llm", "function": "decode", "tokens": 1},
                 **({"audio": audio_step(model, "audio", "main")} if "audio" in parity else {})}
        written = quant.int4_layers + quant.int8_layers
        manifest = build_manifest("coreml", ckpt, args.model, artifacts, files, args, dtype_name,
                                  parity, quant.manifest(**COMPRESSION if written else {}), steps, model=model)
        manifest["schedule"]["coreml"] = {
            "target": args.target,
            "compute_units": {"vision": "cpu_and_ne" if args.ane_vision else args.compute_units,
                              "llm": args.compute_units,
                              **({"audio": args.compute_units} if "audio" in parity else {})},
            "ane_vision": args.ane_vision,
            "state": {"names": state_names, "layers": layers, "shape": state_shape, "dtype": "float16",
                      "slots": slots, "slack_slots": args.prefill_chunk,
                      "reset": "a fresh make_state() (zeros) per conversation; both functions share it"},
            **({"audio_state": coreml_audio_state(model)} if "audio" in parity else {}),
            "write_position": "the T new K/V go to state slots position_ids[0,0] + [0, T): the first new "
                              "position is the number of filled slots",
            "attention_mask": "[1,1,T,C+T] additive, as for ONNX (C cache slots, then the T new tokens); the "
                              "graph moves the new tokens' columns onto their slots and masks the slack",
            "inputs": "float inputs in the model dtype, position_ids / last_index int32; the vision package "
                      "takes one slice per call, the audio package one 1 s chunk",
        }
        write_manifest(out, manifest)
        write_readme(out, manifest)  # the export is an Xcode bundle as it is (ios_bridge.bundle)
        progress.update()
    progress.close()
    print_summary(f"Core ML export of {ckpt.config.variant.name} -> {args.out} ({quant.method}, {args.precision}, "
                  f"{args.target})", rows)
    print(quant.describe() + f"; peak RSS {peak_rss_mb():.0f} MB")
    print("memory after each phase: " + "; ".join(f"{k}: {v}" for k, v in memory.items()))
    for note in quant.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run(main)
