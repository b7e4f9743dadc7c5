"""`python -m export.coreai`: the vision step, the LLM (and MiniCPM-o's audio step) as Core AI assets (`.aimodel`),
plus the manifest.

    python -m export.coreai --model M --out DIR [--quant int4-awq|int4-rtn|none] [--group-size G]
        [--lm-head keep|int8] [--prefill-chunk N] [--max-context N] [--precision fp16|fp32]

Core AI (iOS 27 / macOS 27) runs `.aimodel` assets; coreai-torch converts torch.export programs to them and
the coreai-core wheel runs them on Linux too (CPU), so the whole chain is measured here, not only on a Mac.

Assets (directories; the manifest hashes them with runtime.manifest.sha256_tree):
- `vision.aimodel`, function `main`: one slice per call, the vision inputs at batch 1: pixel_values
  [1,3,p,P*p], position_ids [1,P] (int32 at run time), patch_mask [1,P], pos_embed [1,P,H] -> features
  [1,query_num,H] (`minicpm.split.VisionStep`, the fixed-shape split of every format). MiniCPM-V 4.5: also
  function `video`, one frame group per call ([1,6,...] inputs, unused slots with patch mask 0, through the
  3D resampler: `VideoGroupStep`), sharing the asset's vision weights.
- `llm.aimodel`, functions `prefill` (T = prefill chunk) and `decode` (T = 1) of ONE program: coreai-torch
  stages each torch.export program as an entrypoint of one MLIR module, and constants are attributes uniqued by
  content, so the weights both functions read are stored once (measured: the two-function asset is the size of
  one function plus its graph). Inputs inputs_embeds [1,T,H], position_ids [1,T], attention_mask [1,1,T,C+T]
  (the ONNX graph's additive mask: C cache slots, then the T new tokens), last_index [1] -> logits [1,V].
- The KV cache is Core AI state: buffers `k_cache_{i}` / `v_cache_{i}` [1, kv_heads, C + S, head_dim]
  (S = prefill chunk slack slots) written with `index_copy_` at slots position_ids[0,0] + [0, T) (a slice
  assignment at a traced position does not convert). The runtime takes the state arrays with every call and
  updates them in place: both functions get the same arrays, and zeroed arrays are a new conversation.
  The mask is moved onto the state inside the graph (new tokens' columns at their slots, slack masked), so the
  host builds the very mask it builds for ONNX and ExecuTorch.
- `audio.aimodel` (MiniCPM-o), function `main`: one 1 s chunk per call, the ONNX audio graph's inputs without the
  cache -> tokens; the encoder cache is its own Core AI state, written with `index_copy_` as the LLM's
  (export/coreai_audio.py). Float weights, or with `--quantize-audio` (opt-in) the Whisper blocks' int4 records
  written as the LLM's (below).

Weights. Every Linear is stored transposed, [in, out], and computed as x @ W_t (coreai-core's CPU runtime runs
that ~30x faster than x @ W.T; same arithmetic). int4 records from quant/ (AWQ by default) are written bit for
bit: each quantised Linear becomes `coreai.constexpr_blockwise_shift_scale(codes [in,out], scales [in/g,out],
zero_points [in/g,out])` with `ui4` codes and zero points (the records' values, transposed), dequantised by the
op; a per-row int8 lm_head record (`--lm-head int8`) the same way with `ui8` codes. Scales are the records'
float16 values (in float32 with --precision fp32: exact). The eager module of the export computes exactly
(codes - zeros) * scales, i.e. the PyTorch model of the same quantisation, and parity is measured against it
through the Core AI runtime during the export. (coreai-core's Linux CPU runtime dequantises on every call, so
int4 runs slower than fp32 there: measured, not a property of devices.)

Precision: fp32 by default. `--precision fp16` writes fp16 weights, activations and state (RMSNorm variance in
float32, as transformers computes it) for GPU / Neural Engine devices; the Linux CPU runtime emulates fp16
(measured on the tiny V-4.0: 29 s per vision slice against 0.26 s in fp32), so Linux parity and benches use fp32.

The token embedding table is `token_embedding.bin` (raw [V,H]) gathered by the host, as for every format.

Memory: `--quant int4-rtn` and `none` on a checkpoint stream it (`load_model`): each Linear is read alone, quantised
and installed as its codes, the table is written from the checkpoint, so no float copy of the LLM is held (a
full-size V-4.0 with an int8 head: 12.1 GiB peak, over the 1.3x-checkpoint goal; not yet profiled by phase). AWQ
and quantised directories load the whole float32 model.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
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
from export.coreai_asset import AssetRunner, export_program, import_coreai, save_asset
from export.coreai_audio import coreai_audio_state, export_audio, free_audio_weights
from export.onnx_weights import StreamedWeights
from export.quantization import QUANT_METHODS, Quantization, add_quantize_audio_argument, quantized_model
from ios_bridge.bundle import write_readme
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.split import LanguageModelStep, VideoGroupStep, VisionStep, token_embedding_table
from runtime.cli import run
from runtime.manifest import sha256_tree, write_manifest

VISION_INPUTS = ["pixel_values", "position_ids", "patch_mask", "pos_embed"]
LLM_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index"]
FUNCTIONS = {"prefill": None, "decode": 1}  # tokens per call (prefill: --prefill-chunk)
FORMAT = "coreai.constexpr_blockwise_shift_scale: the records' codes (ui4 / ui8), scales and zero points"


# ---------------------------------------------------------------------------------------------------------
# The modules handed to the converter
# ---------------------------------------------------------------------------------------------------------


class TransposedLinear(nn.Module):
    """A Linear as `x @ W_t + b` with W_t = W.T [in, out] stored: the same arithmetic, but coreai-core's CPU
    runtime computes x @ [in, out] ~30x faster than linear's x @ W.T (4096 x 4096 at T = 1: 3.8 ms against
    120 ms, measured)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features  # read by some callers' code
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        scale = getattr(linear, "input_scale", None)  # InputScaledLinear (an AWQ scale no norm could absorb)
        self.register_buffer("input_scale", None if scale is None else scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        y = torch.matmul(x, self.weight_t.to(x.dtype))
        return y if self.bias is None else y + self.bias


class BlockwiseLinear(TransposedLinear):
    """A Linear whose weight is `constexpr_blockwise_shift_scale(codes, scales, zeros)`: the record's codes as
    Core AI int constants (ui4, or ui8 for an int8 head), dequantised by the op; stored transposed as
    TransposedLinear ([in, out] codes, [in / g, out] scales and zero points: the same values, block axis 0)."""

    def __init__(self, linear: nn.Linear, record, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", record.codes.t().contiguous())
        self.register_buffer("scales", record.scales.t().to(dtype).contiguous())  # float16 values: exact in fp32
        self.register_buffer("zeros", record.zeros.t().contiguous())
        self.bits = record.bits
        self.bias = linear.bias
        scale = getattr(linear, "input_scale", None)
        self.register_buffer("input_scale", None if scale is None else scale.clone())

    @property
    def weight_t(self) -> torch.Tensor:
        return torch.ops.coreai.constexpr_blockwise_shift_scale(
            self.codes, self.scales, self.zeros, None, torch.uint4 if self.bits == 4 else torch.uint8, None)


def transpose_linears(model: nn.Module) -> int:
    """Every float nn.Linear becomes a TransposedLinear (those inside nn.MultiheadAttention stay: it reads their
    weights itself). Returns the number replaced."""
    replaced = 0
    for module in list(model.modules()):
        if isinstance(module, nn.MultiheadAttention):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, TransposedLinear(child))
                replaced += 1
    return replaced


def install_records(model: MiniCPMV, records: dict, dtype: torch.dtype) -> int:
    """Replace every recorded Linear by a `BlockwiseLinear` of its record (checked against the model's weight,
    which quantized_model installed as the record's dequantised values). Returns the number replaced."""
    for name, record in records.items():
        record.check(name)
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear) and (tuple(linear.weight.shape) != record.shape or
                                              not torch.equal(linear.weight.detach().float(),
                                                              record.dequantize(torch.float32))):
            raise UserError(f"quantisation record {name} does not match the model's weight")
        install_record(model, name, record, dtype)
    return len(records)


def install_record(model: MiniCPMV, name: str, record, dtype: torch.dtype) -> None:
    """The Linear `name` becomes the `BlockwiseLinear` of `record` (its own weight is not read: it may be on the
    meta device, export.onnx_weights.StreamedWeights.load_whole)."""
    import_coreai()  # registers torch.ops.coreai.constexpr_blockwise_shift_scale
    parent_name, _, child = name.rpartition(".")
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise UserError(f"quantisation record {name} is a {type(linear).__name__}; Core AI int4/int8 weights "
                        "are written for Linear layers only")
    setattr(model.get_submodule(parent_name), child, BlockwiseLinear(linear, record, dtype))


class StatefulLanguageModel(nn.Module):
    """`LanguageModelStep` with the KV cache in buffers that become Core AI states (see the module docstring).

    inputs_embeds [1,T,H], position_ids [1,T] int64, attention_mask [1,1,T,C+T] additive, last_index [1] int64
    -> logits [1,V]. Exported at T = prefill chunk and T = 1; run eagerly it is the exact PyTorch reference of
    both functions (one set of buffers, as one set of state arrays at run time).
    """

    def __init__(self, model: MiniCPMV, max_context: int, slack: int, dtype: torch.dtype):
        super().__init__()
        try:
            self.step = LanguageModelStep(model, max_context).eval()
        except ValueError as e:  # e.g. a context beyond the rope table's original length
            raise UserError(str(e)) from None
        self.max_context, self.slack, self.layers = max_context, slack, len(self.step.layers)
        self.state_shape = (1, self.step.kv_heads, max_context + slack, self.step.head_dim)
        for name in self.state_names:
            self.register_buffer(name, torch.zeros(self.state_shape, dtype=dtype), persistent=False)

    @property
    def state_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in range(self.layers) for kind in ("k", "v")]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor) -> torch.Tensor:
        tokens = inputs_embeds.shape[1]
        slots = position_ids[0, :1] + torch.arange(tokens)  # the first new position = the filled slots
        # keys [C slots | T new] -> [C slots | S slack] with the new tokens' columns at their slots
        fill = torch.finfo(attention_mask.dtype).min
        mask = torch.cat([attention_mask[..., : self.max_context],
                          torch.full((1, 1, tokens, self.slack), fill, dtype=attention_mask.dtype)], dim=-1)
        mask = mask.index_copy(3, slots, attention_mask[..., self.max_context:])

        def attend_over(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            keys.index_copy_(2, slots, k.to(keys.dtype))  # index_copy_ on a buffer: a Core AI state write
            values.index_copy_(2, slots, v.to(values.dtype))
            return keys.to(k.dtype), values.to(v.dtype)

        return self.step.run_layers(inputs_embeds, position_ids, mask, last_index, attend_over)

    def reset(self) -> None:
        for name in self.state_names:
            getattr(self, name).zero_()


# ---------------------------------------------------------------------------------------------------------
# Parity inputs: the calls runtime/session.py makes
# ---------------------------------------------------------------------------------------------------------


def schedule_inputs(embeds: np.ndarray, past: int, width: int, max_context: int, dtype) -> dict[str, np.ndarray]:
    """One LLM call as the session builds it: `len(embeds)` new tokens after `past` filled slots, padded to
    `width` rows (mask: filled slots, then the new tokens causally; pad rows see only new rows)."""
    n, hidden = embeds.shape
    neg = np.float32(-1e30)
    x = np.zeros((1, width, hidden), dtype=np.float32)
    x[0, :n] = embeds
    positions = np.minimum(np.arange(past, past + width), max_context - 1).astype(np.int64)[None]
    mask = np.full((1, 1, width, max_context + width), neg, dtype=np.float32)
    mask[0, 0, :n, :past] = 0.0
    mask[0, 0, :, max_context:] = np.triu(np.full((width, width), neg, dtype=np.float32), 1)
    mask = np.maximum(mask, np.finfo(dtype).min)
    return {"inputs_embeds": x.astype(dtype), "position_ids": positions, "attention_mask": mask.astype(dtype),
            "last_index": np.asarray([n - 1], dtype=np.int64)}


def parity_calls(max_context: int, chunk: int, hidden: int, dtype, seed: int = 0):
    """(function, inputs): a full prefill chunk, two decode steps, and a last padded chunk near the end of the
    context whose pad rows run into the slack."""
    rng = np.random.RandomState(seed)
    tail = max(1, min(chunk, max_context - 2) - 2)
    past = 0
    for n, start, width in ((min(chunk, max_context - 1), 0, chunk), (1, None, 1), (1, None, 1),
                            (tail, max_context - tail, chunk)):
        past = past if start is None else start
        yield ("decode" if width == 1 else "prefill"), schedule_inputs(rng.randn(n, hidden).astype(np.float32),
                                                                       past, width, max_context, dtype)
        past += n


@torch.no_grad()
def eager_logits(wrapper: StatefulLanguageModel, calls: list) -> list[np.ndarray]:
    wrapper.reset()
    out = [wrapper(**{k: torch.from_numpy(v) for k, v in inputs.items()}).float().numpy() for _, inputs in calls]
    wrapper.reset()
    return out


def runtime_logits(runner: AssetRunner, calls: list, state_shape: tuple, dtype) -> list[np.ndarray]:
    """The same calls through the Core AI runtime, both functions sharing one set of state arrays."""
    state = runner.new_state("decode", dict.fromkeys(runner.functions["decode"].desc.state_names, state_shape), dtype)
    return [runner(function, inputs, state)["logits"].astype(np.float32) for function, inputs in calls]


# ---------------------------------------------------------------------------------------------------------
# Export steps
# ---------------------------------------------------------------------------------------------------------


def vision_examples(model: MiniCPMV, max_patches: int, dtype) -> list[dict[str, np.ndarray]]:
    """`export.bundle.vision_example` as numpy arrays, float inputs in the asset's dtype."""
    return [{k: v.numpy().astype(dtype) if v.is_floating_point() else v.numpy() for k, v in e.items()}
            for e in vision_example(model, max_patches)]


@torch.no_grad()
def export_vision(model: MiniCPMV, out: Path, max_patches: int, dtype) -> tuple[Path, dict, dict]:
    """vision.aimodel; each function's I/O and max |error| of the Core AI runtime against its eager step.
    MiniCPM-V 4.5 adds the `video` function (one frame group of 6 slots through the 3D resampler): one asset,
    so the functions share the vision weights (constants are uniqued by content)."""
    steps = {"main": (VisionStep(model).eval(), vision_examples(model, max_patches, dtype))}
    if model.resampler.temporal:
        groups = video_example(model, max_patches)
        steps["video"] = (VideoGroupStep(model).eval(),
                          [{k: v[i:i + 1].numpy().astype(dtype) if v.is_floating_point() else v[i:i + 1].numpy()
                            for k, v in groups.items()} for i in range(len(groups["pixel_values"]))])
    programs = {name: export_program(step, tuple(torch.from_numpy(examples[0][n]) for n in VISION_INPUTS))
                for name, (step, examples) in steps.items()}
    path = save_asset(programs, out / "vision.aimodel", VISION_INPUTS, ["features"])
    errors, io = {}, {}
    with AssetRunner(path) as runner:
        for name, (step, examples) in steps.items():
            errors["vision" if name == "main" else name] = max(
                max_abs_error(runner(name, e)["features"],
                              step(*(torch.from_numpy(e[n]) for n in VISION_INPUTS)).float().numpy())
                for e in examples)
            io[name] = runner.describe(name)
    return path, io, errors


@torch.no_grad()
def export_llm(wrapper: StatefulLanguageModel, out: Path, chunk: int, hidden: int, dtype,
               progress: tqdm) -> tuple[Path, dict, float]:
    """llm.aimodel with `prefill` and `decode`; the functions' I/O and max |logit error| through the runtime
    against the eager wrapper over `parity_calls`."""
    programs = {}
    for name, tokens in FUNCTIONS.items():
        tokens = tokens or chunk
        progress.set_postfix_str(f"llm {name} (T={tokens}): torch.export")
        example = schedule_inputs(np.zeros((tokens, hidden), np.float32), 0, tokens, wrapper.max_context, dtype)
        programs[name] = export_program(wrapper, tuple(torch.from_numpy(example[n]) for n in LLM_INPUTS))
        wrapper.reset()  # tracing ran the module: keep its buffers a fresh conversation
    progress.set_postfix_str("llm: converting prefill + decode")
    path = save_asset(programs, out / "llm.aimodel", LLM_INPUTS, ["logits"], wrapper.state_names)
    del programs
    gc.collect()
    progress.set_postfix_str("llm: parity through the Core AI runtime")
    calls = list(parity_calls(wrapper.max_context, chunk, hidden, dtype))
    expected = eager_logits(wrapper, calls)
    with AssetRunner(path) as runner:
        got = runtime_logits(runner, calls, wrapper.state_shape, dtype)
        io = {name: runner.describe(name) for name in FUNCTIONS}
    return path, io, max(max_abs_error(g, e) for g, e in zip(got, expected, strict=True))


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def asset_entry(path: Path, functions: dict) -> dict:
    entry = {"path": path.name, "sha256": sha256_tree(path), "size": tree_size(path), "format": "aimodel",
             "sha256_of": "directory tree (runtime.manifest.sha256_tree)", "functions": functions}
    if list(functions) == ["main"]:
        entry.update(inputs=functions["main"]["inputs"], outputs=functions["main"]["outputs"])
    return entry


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def prepare_model(ckpt: Checkpoint, quant: str | None = None, group_size: int | None = None,
                  lm_head: str | None = None, samples: int = 32, calib: str | None = None,
                  quantize_audio: bool | None = None) -> tuple[MiniCPMV, dict, Quantization]:
    """The float32 model with its quantised weights installed, the records to write (LLM, and the audio encoder's
    with quantize_audio or from a directory that has them) and a summary. Defaults for Core AI: a quantised
    checkpoint's own method, else int4 AWQ; lm_head as the records are, else float."""
    return quantized_model(ckpt, quant, group_size, None, lm_head, samples, calib, default="int4-awq",
                           quantize_audio=quantize_audio)


def load_model(ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype
               ) -> tuple[MiniCPMV, Quantization, Callable[[], torch.Tensor]]:
    """The model in `dtype` with its records installed as `BlockwiseLinear`s, its Quantization, and the token
    embedding table for token_embedding.bin. `--quant int4-rtn` or `none` on a checkpoint streams it
    (export.onnx_weights.StreamedWeights.load_whole: each Linear quantised alone from its stored weight, no float
    copy of the LLM, the table left in the checkpoint), which is what lets a full-size model export within memory;
    AWQ (it calibrates on the whole float model) and quantised directories load the whole float32 model
    (`prepare_model`). Same codes and scales either way, so the same assets."""
    if (ckpt.path / "quant_config.json").is_file() or args.quant in (None, "int4-awq"):
        model, records, quant = prepare_model(ckpt, args.quant, args.group_size, args.lm_head, args.samples,
                                              args.calib, args.quantize_audio or None)
        install_records(model, records, torch.float32)  # checked against the float32 weights, then cast
        model.to(dtype)
        return model, quant, lambda: token_embedding_table(model)
    weights = StreamedWeights(ckpt, argparse.Namespace(**vars(args), symmetric=False, accuracy_level=0), dtype,
                              audio_level=0)
    weights.load_whole(lambda name, record: install_record(weights.model, name, record, dtype))
    weights.model.eval()
    return weights.model, weights.quant, weights.embedding_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.coreai", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--quant", choices=QUANT_METHODS,
                        help="LLM weights: int4 AWQ (default; built-in calibration set), int4 round-to-nearest, or "
                             "none. A quantised checkpoint directory (python -m quant.awq) brings its own records.")
    add_quantize_audio_argument(parser)
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), help="input channels per int4 group (128)")
    parser.add_argument("--lm-head", choices=("keep", "int8"), help="output head: float (keep) or per-row int8")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp32",
                        help="weights, compute and KV state (default fp32; RMSNorm variance stays float32 either way). "
                             "fp16 is for devices: the Linux CPU runtime computes it ~100x slower")
    parser.add_argument("--samples", type=int, default=32, help="AWQ calibration samples (default 32)")
    parser.add_argument("--calib", help="AWQ calibration JSONL (default: the built-in offline set)")
    args = parser.parse_args(argv)
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415

    args.hybrid = is_hybrid_model(args.model)
    if not args.hybrid:  # the hybrid exporter checks them once its --max-patches default is known
        check_export_arguments(args)
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_coreai()
    if args.hybrid:  # MiniCPM-V 4.6 / 4.7: the LLM step with its state as Core AI state
        from export.coreai_hybrid import export_hybrid  # noqa: PLC0415

        return export_hybrid(args)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    np_dtype = np.float16 if args.precision == "fp16" else np.float32
    dtype_name = "float16" if args.precision == "fp16" else "float32"
    # Loading and quantising come first: a bad model or a conflicting --quant is one line on stderr.
    ckpt = Checkpoint.open(args.model)
    model, quant, table = load_model(ckpt, args, dtype)
    transpose_linears(model)
    progress = tqdm(total=5, desc="export.coreai", unit="step")
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        progress.set_postfix_str("vision asset")
        vision, vision_io, errors = export_vision(model, out, args.max_patches, np_dtype)
        parity.update(errors)
        rows.append(("vision.aimodel" + (" (+video)" if "video" in errors else ""), tree_size(vision),
                     max(errors.values()), time.perf_counter() - t))
        artifacts["vision"] = asset_entry(vision, vision_io)
        del model.vpm, model.resampler  # the vision weights are done with: free them before the LLM
        gc.collect()
        progress.update()

        if hasattr(model, "apm"):  # MiniCPM-o: the audio encoder, one 1 s chunk per call
            t = time.perf_counter()
            progress.set_postfix_str("audio asset")
            audio, audio_io, parity["audio"] = export_audio(model, out, np_dtype)
            rows.append(("audio.aimodel", tree_size(audio), parity["audio"], time.perf_counter() - t))
            artifacts["audio"] = asset_entry(audio, {"main": audio_io})
            free_audio_weights(model)  # as the vision weights (the modules' shapes stay for the manifest)
            gc.collect()
        progress.update()

        progress.set_postfix_str("embedding table, tokenizer")
        t = time.perf_counter()
        artifacts["token_embedding"] = write_embedding_table(None, out, dtype, table())
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out)
        progress.update()

        t = time.perf_counter()
        wrapper = StatefulLanguageModel(model, args.max_context, args.prefill_chunk, dtype).eval()
        llm, llm_io, parity["llm"] = export_llm(wrapper, out, args.prefill_chunk, ckpt.config.hidden_size, np_dtype,
                                                progress)
        state_names, state_shape = wrapper.state_names, list(wrapper.state_shape)
        del wrapper, model.llm  # the model object stays for the manifest's audio facts
        gc.collect()
        rows.append(("llm.aimodel (prefill+decode)", tree_size(llm), parity["llm"], time.perf_counter() - t))
        artifacts["llm"] = asset_entry(llm, llm_io)
        artifacts["llm"]["default_function"] = "decode"
        progress.update()

        progress.set_postfix_str("manifest")
        steps = {"vision": {"artifact": "vision", "function": "main", "batch": 1},
                 **({"video": {"artifact": "vision", "function": "video", "frames": VIDEO_FRAME_SLOTS, "batch": 1}}
                    if "video" in errors else {}),
                 "prefill": {"artifact": "llm", "function": "prefill", "tokens": args.prefill_chunk},
                 "decode": {"artifact": "llm", "function": "decode", "tokens": 1},
                 **({"audio": audio_step(model, "audio", "main")} if "audio" in artifacts else {})}
        written = quant.int4_layers + quant.int8_layers
        manifest = build_manifest("coreai", ckpt, args.model, artifacts, files, args, dtype_name, parity,
                                  quant.manifest(**({"format": FORMAT} if written else {})), steps, model=model)
        manifest["schedule"]["coreai"] = {
            "state": {"names": state_names, "shape": state_shape, "dtype": dtype_name,
                      "slots": args.max_context + args.prefill_chunk, "slack_slots": args.prefill_chunk,
                      "reset": "fresh zeroed state arrays per conversation; both functions get the same arrays"},
            **({"audio_state": coreai_audio_state(model, dtype_name)} if "audio" in artifacts else {}),
            "write_position": "the T new K/V go to state slots position_ids[0,0] + [0, T): the first new position "
                              "is the number of filled slots",
            "attention_mask": "[1,1,T,C+T] additive, as for ONNX (C cache slots, then the T new tokens); the graph "
                              "moves the new tokens' columns onto their slots and masks the slack",
            "inputs": "float inputs in the model dtype, position_ids / last_index int32; the vision asset takes "
                      "one slice per call, the audio asset one 1 s chunk",
        }
        write_manifest(out, manifest)
        write_readme(out, manifest)  # the export is an Xcode bundle as it is (ios_bridge.bundle)
        progress.update()
    progress.close()
    print_summary(f"Core AI export of {ckpt.config.variant.name} -> {args.out} ({quant.method}, {args.precision}; "
                  "max |err| measured through the Core AI runtime)", rows)
    print(quant.describe() + f"; peak RSS {peak_rss_mb():.0f} MB")
    for note in quant.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run(main)
