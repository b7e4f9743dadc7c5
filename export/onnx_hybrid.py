"""`python -m export.onnx` for the hybrid models (MiniCPM-V 4.6 / 4.7): the LLM step with its per-layer state and
the one-slice vision step.

`export.onnx` dispatches here when the checkpoint's config.json names a hybrid model_type. Written:
- `llm.onnx`: `minicpm.hybrid_step.HybridLanguageModelStep` with a dynamic token count T (1 .. prefill chunk): one
  graph for prefill chunks and decode. Inputs `inputs_embeds [1, T, H]`, `position_ids [3, T]` (M-RoPE rows),
  `attention_mask [1, 1, T, C + T]`, `last_index [1]`, `valid_tokens [1]`, then every state tensor under its
  `StateSpec` name (`past_keys`, `past_values`, `conv_state`, `recurrent_state`). Outputs `logits [1, V]`, then one
  per state tensor under `StateTensor.output`: `new_keys` / `new_values` (the T new K/V rows, named as in the older
  models' graphs: the host appends the valid ones) and `new_conv_state` / `new_recurrent_state` (whole
  replacements). Plain input/output tensors rather than `present.*` aliases: onnxruntime has no in-place state, and
  the manifest's state section says which output updates which input and how.
- the token embedding table, tokenizer + processor files (the runtime rebuilds the model's own processor offline),
  and `manifest.json` with `schedule.state` = `StateSpec.to_dict()` and `schedule.positions` (M-RoPE, host side).

The delta rule in the graph: the torch step picks its sub-chunk size from T (`min(16, T)`) and loops over
sub-chunks in Python, which a graph with a symbolic T cannot hold. The exported step pads T to a multiple of 16
inside the graph (pad rows: decay 0, beta 0, so the state is untouched; the same rule the host uses for a padded
chunk) and runs the sub-chunk recurrence as a `scan` (ONNX `Scan`) over a symbolic number of sub-chunks. Same
mathematics, measured against the unmodified torch step.

- `vision.onnx`: `minicpm.hybrid_vision.HybridVisionStep`, one image slice per call at a fixed patch row of P =
  `--max-patches` patches (default: `max_patches_bound` of the checkpoint's image processor settings, the largest
  slice it makes up to aspect 20), every index and mask computed on the host. Inputs `pixel_values [1, 3, p, P*p]`,
  `position_ids [P]`, `patch_order [P]`, `patch_mask [P]`; output `features [P / m, H]` (m patches per token: 16
  in "16x" mode, 4 in "4x"), of which the first (h/4)(w/4) rows ("16x") are the slice's tokens. The manifest's
  `steps.vision` lists the layout as data (P, inputs, downsample_mode, window and merge kernels, the valid-rows
  rule), so a runtime builds the inputs without the model config; `schedule.modalities` gains "image". Parity is
  measured on every slice of a sliced test photo against the unmodified torch step.

int4 (`--quant int4-awq|int4-rtn`, or a quantised directory from `python -m quant.awq` as --model): the Qwen3.5
layers' quantised Linears (quant/layout.py) and, with `--lm-head int8`, the head become `com.microsoft.MatMulNBits`
nodes holding the records' codes bit for bit, as in export/onnx.py (export/matmul_nbits.py; initializers named after
the layer, `model.language_model.layers.0.linear_attn.in_proj_qkv.qweight`, ...). The vision graph stays float unless
`--vision-weights int8` (export.onnx's int8 vision, onnxruntime's quantize_dynamic).
Parity is measured against the torch step running the same quantised weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from export import matmul_nbits
from export.bundle import (
    MODEL_FILES,
    build_hybrid_manifest,
    check_export_arguments,
    copy_model_files,
    file_entry,
    max_abs_error,
    print_summary,
    staged_directory,
    write_embedding_table,
)
from export.quantization import quantized_model
from minicpm.cache import StateCache, StateSpec
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep, carry_chunk, chunk_terms
from minicpm.hybrid_vision import HybridVisionStep, max_patches_bound, split_slices
from minicpm.v4_6 import HybridCheckpoint, is_hybrid_config
from runtime.manifest import write_manifest

SUB_CHUNK = 16  # rows per delta-rule sub-chunk, as the torch step
HYBRID_FILES = [*MODEL_FILES, "processor_config.json", "video_preprocessor_config.json"]
STEP_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens"]
VISION_IO = (["pixel_values", "position_ids", "patch_order", "patch_mask"], ["features"])


def is_hybrid_model(name: str) -> bool:
    """True when `name` (directory, hub id, short or tiny name) resolves to a MiniCPM-V 4.6 / 4.7 checkpoint."""
    from minicpm.checkpoint import resolve_model  # noqa: PLC0415

    config = resolve_model(name) / "config.json"
    try:
        return is_hybrid_config(json.loads(config.read_text()))
    except (OSError, ValueError, RecursionError):
        return False  # the older family's loader names the problem


def scan_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                    beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`minicpm.hybrid_step.gated_delta_rule` for a symbolic T: fixed sub-chunks of 16 rows (T padded with decay 0,
    beta 0: no effect on the state), the within-chunk algebra batched over sub-chunks, the state carried from one
    sub-chunk to the next by `scan`."""
    from torch._higher_order_ops.scan import scan  # noqa: PLC0415

    heads, tokens = key.shape[:2]
    terms = chunk_terms(query, key, value, decay, beta, SUB_CHUNK)
    xs = [t.transpose(0, 1) for t in terms]  # chunks first
    state, outs = scan(lambda carry, x: carry_chunk(carry, *x), state, xs)
    out = outs.transpose(0, 1).reshape(heads, -1, outs.shape[-1])[:, :tokens]
    return out, state


STATE_NAMES = ["past_keys", "past_values", "conv_state", "recurrent_state"]


class OnnxHybridStep(HybridLanguageModelStep):
    """The hybrid step as traced into llm.onnx: only the delta rule's formulation differs (see the module doc).
    The state tensors are named arguments (torch.export takes a `*state` as one nested argument)."""

    delta_rule = staticmethod(scan_delta_rule)

    def __init__(self, model, max_context: int, max_chunk: int):
        super().__init__(model, max_context, max_chunk)
        if self.spec.names != STATE_NAMES:
            raise UserError(f"the ONNX exporter expects both full-attention and linear-attention layers (state "
                            f"{', '.join(STATE_NAMES)}), this model has {', '.join(self.spec.names)}")

    def forward(self, inputs_embeds, position_ids, attention_mask, last_index, valid_tokens, past_keys, past_values,
                conv_state, recurrent_state):
        return super().forward(inputs_embeds, position_ids, attention_mask, last_index, valid_tokens, past_keys,
                               past_values, conv_state, recurrent_state)


def step_names(spec: StateSpec) -> tuple[list[str], list[str]]:
    """llm.onnx input and output names, in argument / result order."""
    return STEP_INPUTS + spec.names, ["logits"] + [t.output for t in spec.tensors]


def parity_examples(step: HybridLanguageModelStep, chunk: int, dtype: torch.dtype) -> list[tuple]:
    """Step inputs on a random state: a full chunk after 5 cached tokens, a padded last chunk (3 pad rows of
    garbage), and a decode step at the last cache slot. Random, not zero, state so every path is exercised."""
    gen = torch.Generator().manual_seed(0)
    spec, hidden = step.spec, step.config.hidden_size
    out = []
    for tokens, valid, past in ((chunk, chunk, 5), (chunk, max(1, chunk - 3), 9), (1, 1, spec.max_context - 1)):
        cache = StateCache(spec)
        cache.state = {t.name: (torch.randn(t.shape, generator=gen) * (0.1 if t.kind == "recurrent" else 1.0))
                       .to(t.torch_dtype if t.kind == "recurrent" else dtype) for t in spec.tensors}
        cache.length = past
        embeds = torch.randn(1, tokens, hidden, generator=gen).to(dtype)
        positions = (torch.arange(past, past + tokens) + torch.tensor([0, 1, 2])[:, None]).clamp(max=spec.max_context
                                                                                                  - 1)
        out.append((embeds, positions, cache.attention_mask(tokens, dtype), torch.tensor([valid - 1]),
                    torch.tensor([valid]), *cache.inputs()))
    return out


def export_llm(model, out: Path, max_context: int, chunk: int, dtype: torch.dtype,
               records: dict | None = None) -> tuple[dict, float, StateSpec]:
    """Trace the hybrid step with a dynamic token count; measure onnxruntime against the torch step (its own
    delta rule) at T = chunk, a padded last chunk and T = 1. `records`: the quantised layers already installed as
    MatMulNBitsLinear (their initializers get the records' names)."""
    from export.onnx import _artifact, _export, _ort_run  # noqa: PLC0415 (export.onnx dispatches to this module)

    reference = HybridLanguageModelStep(model, max_context, max_chunk=chunk).eval()
    # T is symbolic up to max_context, as in the older models' graph: a bound at the chunk lets torch.export
    # specialise small chunks (every T <= 16 is one sub-chunk). The trace example spans two sub-chunks.
    step = OnnxHybridStep(model, max_context, max_chunk=max_context).eval()
    spec = step.spec
    names = step_names(spec)
    examples = parity_examples(step, chunk, dtype)
    trace = parity_examples(step, min(2 * SUB_CHUNK + 3, max_context - 1), dtype)[0]
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    dynamic = ({1: tokens}, {1: tokens}, {2: tokens, 3: tokens + max_context}, None, None) + (None,) * len(spec.names)
    path = out / "llm.onnx"
    _export(step, trace, path, names, dynamic, matmul_nbits.initializer_names(step, model, records or {}))
    error = 0.0
    for args in examples:
        with torch.no_grad():
            expected = [x.float().numpy() for x in reference(*args)]
        got = _ort_run(path, {n: a.numpy() for n, a in zip(names[0], args, strict=True)})
        error = max(error, *(max_abs_error(g, e) for g, e in zip(got, expected, strict=True)))
    return _artifact(out, path), error, spec


def test_photo(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic photo-like test image (smooth colour fields, an edge and mild noise; made here, no network):
    at 640x480 the processor slices it (source image + a 1x2 grid)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(4 * y - 3 * x), 0.3 + 0.5 * (x > y)], -1)
    rgb += np.random.RandomState(0).normal(0, 0.03, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def default_max_patches(ckpt: HybridCheckpoint) -> int:
    """The vision graph's patch row when --max-patches is not given: the largest slice the checkpoint's image
    processor makes from any image up to aspect ratio 20 (`max_patches_bound`)."""
    ip = ckpt.processor.image_processor
    return max_patches_bound(ip.scale_resolution, ip.patch_size, ip.downsample_mode)


def vision_examples(step: HybridVisionStep, ckpt: HybridCheckpoint, max_patches: int, dtype: torch.dtype
                    ) -> list[tuple[torch.Tensor, ...]]:
    """The step's inputs (in `VISION_IO` order) for every slice of the sliced test photo, each padded to the row:
    what every format's vision parity is measured on."""
    layout = step.layout
    if max_patches % layout.patches_per_token:
        raise UserError(f"--max-patches {max_patches} must be a multiple of {layout.patches_per_token} (the patches "
                        f"one token merges in {ckpt.processor.image_processor.downsample_mode} mode)")
    processed = ckpt.processor.image_processor([test_photo()], return_tensors="pt")
    examples = []
    for one in split_slices(processed):
        inputs = step.vision_inputs(one, max_patches)  # float32 / int64 numpy, as the runtime builds them
        examples.append(tuple(torch.from_numpy(inputs[n]).to(dtype) if inputs[n].dtype == np.float32
                              else torch.from_numpy(inputs[n]) for n in VISION_IO[0]))
    return examples


def vision_facts(step: HybridVisionStep, mode: str, max_patches: int) -> dict:
    """`steps.vision` of the manifest: the one-slice step's layout as data (every format's, with its artifact)."""
    layout = step.layout
    return {
        "artifact": "vision", "slices_per_call": 1, "max_patches": max_patches,
        "inputs": VISION_IO[0], "output": VISION_IO[1][0], "downsample_mode": mode,
        "patch_size": layout.patch_size, "num_patches_per_side": layout.num_patches_per_side,
        "window": layout.window, "merge": list(layout.merge), "merger_times": layout.merger_times,
        "block": list(layout.block), "rows": max_patches // layout.patches_per_token,
        "valid_rows": f"the first (h / {layout.block[0]}) * (w / {layout.block[1]}) rows of a slice of h x w "
                      "patches are its tokens in the model's order (keep them); the rest are zeros",
        "host": "minicpm.hybrid_vision.vision_inputs: the processor's patch row zero-padded to max_patches, NaViT "
                "position ids, the nested block order (window, then merge blocks) and the patch mask",
    }


def export_vision(model, ckpt: HybridCheckpoint, out: Path, max_patches: int, dtype: torch.dtype,
                  int8: bool = False) -> tuple[dict, float, dict]:
    """Trace the one-slice vision step at a fixed patch row (int8 weights with `int8`, export.onnx.quantize_int8);
    measure onnxruntime against the float torch step on every slice of a sliced test photo (each padded to the
    row). Returns the artifact, the error and `steps.vision`."""
    import onnxruntime as ort  # noqa: PLC0415

    from export.onnx import _artifact, _export, quantize_int8  # noqa: PLC0415 (export.onnx dispatches here)

    mode = ckpt.processor.image_processor.downsample_mode  # the mode the processor counted placeholders with
    step = HybridVisionStep(model, downsample_mode=mode).eval()
    examples = vision_examples(step, ckpt, max_patches, dtype)
    path = out / "vision.onnx"
    _export(step, examples[0], path, VISION_IO, None)  # every shape static: one slice, P patches
    if int8:
        quantize_int8(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    error = 0.0
    for args in examples:
        with torch.no_grad():
            expected = step(*args).float().numpy()
        got = session.run(None, {n: a.numpy() for n, a in zip(VISION_IO[0], args, strict=True)})[0]
        error = max(error, max_abs_error(got, expected))
    return _artifact(out, path), error, vision_facts(step, mode, max_patches)


def check_hybrid_arguments(args: argparse.Namespace) -> None:
    """What a hybrid export cannot do, refused in one line before anything is loaded (the rest of --quant's options
    are checked by export.quantization.quantized_model)."""
    quant = getattr(args, "quant", None)
    if getattr(args, "quantize_audio", False):
        raise UserError("--quantize-audio applies to MiniCPM-o exports (MiniCPM-V 4.6 / 4.7 have no audio encoder)")
    if getattr(args, "lm_head", None) not in (None, "keep") and quant == "none":
        raise UserError("--lm-head int8 applies to int4 quantisation, not --quant none")
    if getattr(args, "symmetric", False) and quant == "none":
        raise UserError("--symmetric applies to int4 quantisation, not --quant none")
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")


def open_hybrid(args: argparse.Namespace) -> HybridCheckpoint:
    """The checkpoint of a hybrid export, with --max-patches defaulting to its processor's bound (not the older
    models' default) and the export arguments checked against it."""
    ckpt = HybridCheckpoint.open(args.model)
    if args.max_patches is None:
        args.max_patches = default_max_patches(ckpt)
    check_export_arguments(args)
    return ckpt


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.onnx, not yet checked:
    --max-patches defaults to the checkpoint's processor bound here)."""
    check_hybrid_arguments(args)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    ckpt = open_hybrid(args)
    # Quantising (AWQ shows its own progress) comes before the progress bar, as in export.onnx.
    model, records, quant = quantized_model(ckpt, args.quant, args.group_size, args.symmetric or None, args.lm_head,
                                            args.samples, args.calib)
    model.to(dtype)
    matmul_nbits.install(model, records, dtype, args.accuracy_level)
    steps = tqdm(total=4, desc="export.onnx", unit="step")
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        steps.set_postfix_str("vision graph")
        artifacts["vision"], parity["vision"], vision = export_vision(model, ckpt, out, args.max_patches, dtype,
                                                                      args.vision_weights == "int8")
        rows.append(("vision.onnx (+ .data)", _size(out, "vision.onnx"), parity["vision"], time.perf_counter() - t))
        steps.update()
        t = time.perf_counter()
        steps.set_postfix_str("llm graph")
        artifacts["llm"], parity["llm"], spec = export_llm(model, out, args.max_context, args.prefill_chunk, dtype,
                                                           records)
        rows.append(("llm.onnx (+ .data)", _size(out, "llm.onnx"), parity["llm"], time.perf_counter() - t))
        steps.update()
        steps.set_postfix_str("embedding table, tokenizer, processor")
        t = time.perf_counter()
        artifacts["token_embedding"] = write_embedding_table(None, out, dtype, model.get_input_embeddings().weight)
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out, HYBRID_FILES)
        files += [file_entry(out, p.name) for p in sorted(out.glob("*.onnx.data"))]
        steps.update()
        steps.set_postfix_str("manifest")
        entry = quant.manifest()
        if records:
            entry.update(format="com.microsoft MatMulNBits: the records' codes, scales and zero points",
                         accuracy_level=args.accuracy_level)
        if args.vision_weights == "int8":
            from export.onnx import VISION_INT8  # noqa: PLC0415 (export.onnx dispatches to this module)

            entry["vision"] = VISION_INT8
        manifest = build_hybrid_manifest("onnx", ckpt, args.model, artifacts, files, args,
                                         "float16" if args.dtype == "fp16" else "float32", parity, spec,
                                         {"vision": vision,
                                          # any T: the graph pads to whole sub-chunks itself
                                          "prefill": {"artifact": "llm", "tokens": args.prefill_chunk,
                                                      "min_tokens": 1},
                                          "decode": {"artifact": "llm", "tokens": 1}}, entry)
        write_manifest(out, manifest)
        steps.update()
    steps.close()
    print_summary(f"ONNX export of {ckpt.variant.name} -> {args.out}", rows)
    print(quant.describe() + (f", MatMulNBits accuracy_level {args.accuracy_level}" if records else ""))
    for note in quant.notes:
        print(f"note: {note}")
    print(f"vision: {args.vision_weights} weights, one slice per call, {args.max_patches} patches "
          f"({vision['rows']} feature rows, {vision['downsample_mode']} mode)")
    return 0


def _size(out: Path, name: str) -> int:
    return sum(p.stat().st_size for p in out.glob(f"{name}*"))

