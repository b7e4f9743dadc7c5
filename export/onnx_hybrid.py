"""`python -m export.onnx` for the hybrid models (MiniCPM-V 4.6 / 4.7): the LLM step with its per-layer state.

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

Vision: this export is text-only until the vision step (`minicpm.hybrid_vision`) lands; the manifest says so
(`schedule.modalities`) and the runtime refuses an image in one line. Quantisation: float only for now (int4 of the
gated delta-net projections needs the Qwen3.5 layout in quant/): an explicit `--quant int4-*` is refused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from export.bundle import (
    MODEL_FILES,
    build_hybrid_manifest,
    copy_model_files,
    file_entry,
    max_abs_error,
    print_summary,
    staged_directory,
    write_embedding_table,
)
from minicpm.cache import StateCache, StateSpec
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep, unit_lower_inverse
from minicpm.v4_6 import HybridCheckpoint, is_hybrid_config
from runtime.manifest import write_manifest

SUB_CHUNK = 16  # rows per delta-rule sub-chunk, as the torch step
HYBRID_FILES = [*MODEL_FILES, "processor_config.json", "video_preprocessor_config.json"]
STEP_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens"]


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
    chunks = (tokens + SUB_CHUNK - 1) // SUB_CHUNK
    pad = chunks * SUB_CHUNK - tokens
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    decay, beta = (F.pad(x, (0, pad)) for x in (decay, beta))
    query, key, value = (x.reshape(heads, chunks, SUB_CHUNK, x.shape[-1]) for x in (query, key, value))
    decay, beta = decay.reshape(heads, chunks, SUB_CHUNK), beta.reshape(heads, chunks, SUB_CHUNK)
    lower = torch.ones(SUB_CHUNK, SUB_CHUNK, dtype=torch.bool, device=key.device).tril()
    cum = decay.cumsum(-1)
    pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    k_beta = key * beta[..., None]
    a = ((k_beta @ key.transpose(-1, -2)) * pair).masked_fill(~lower.tril(-1), 0.0)
    inverse = unit_lower_inverse(a)
    new_values = inverse @ (value * beta[..., None])
    k_cumdecay = inverse @ (k_beta * cum.exp()[..., None])
    intra = (query @ key.transpose(-1, -2)) * pair
    query = query * cum.exp()[..., None]
    last = cum[..., -1:]
    key = key * (last - cum).exp()[..., None]
    chunk_decay = last.exp()[..., None]  # [h, chunks, 1, 1]

    def step(carry, q, k, v, kc, it, cd):
        v_new = v - kc @ carry
        out = q @ carry + it @ v_new
        return carry * cd + k.transpose(-1, -2) @ v_new, out

    xs = [x.transpose(0, 1) for x in (query, key, new_values, k_cumdecay, intra, chunk_decay)]  # chunks first
    state, outs = scan(lambda carry, x: step(carry, *x), state, xs)
    out = outs.transpose(0, 1).reshape(heads, chunks * SUB_CHUNK, -1)[:, :tokens]
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


def export_llm(model, out: Path, max_context: int, chunk: int, dtype: torch.dtype) -> tuple[dict, float, StateSpec]:
    """Trace the hybrid step with a dynamic token count; measure onnxruntime against the torch step (its own
    delta rule) at T = chunk, a padded last chunk and T = 1."""
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
    _export(step, trace, path, names, dynamic)
    error = 0.0
    for args in examples:
        with torch.no_grad():
            expected = [x.float().numpy() for x in reference(*args)]
        got = _ort_run(path, {n: a.numpy() for n, a in zip(names[0], args, strict=True)})
        error = max(error, *(max_abs_error(g, e) for g, e in zip(got, expected, strict=True)))
    return _artifact(out, path), error, spec


def check_hybrid_arguments(args: argparse.Namespace) -> None:
    """What a hybrid export cannot do yet, refused in one line before anything is loaded."""
    if args.quant not in (None, "none"):
        raise UserError(f"--quant {args.quant}: int4 for MiniCPM-V 4.6 / 4.7 is not yet supported (the gated "
                        "delta-net layout is not in quant/); export with --quant none")
    if getattr(args, "quantize_audio", False):
        raise UserError("--quantize-audio applies to MiniCPM-o exports (MiniCPM-V 4.6 / 4.7 have no audio encoder)")
    if getattr(args, "lm_head", None) not in (None, "keep"):
        raise UserError("--lm-head int8 needs int4 quantisation, which MiniCPM-V 4.6 / 4.7 exports do not have yet")


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.onnx)."""
    check_hybrid_arguments(args)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    ckpt = HybridCheckpoint.open(args.model)
    if (ckpt.path / "quant_config.json").is_file():
        raise UserError(f"{ckpt.path}: quantised MiniCPM-V 4.6 / 4.7 checkpoints are not yet supported by the ONNX "
                        "exporter")
    model, _ = ckpt.load_model("float32")
    model.to(dtype)
    steps = tqdm(total=3, desc="export.onnx", unit="step")
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        steps.set_postfix_str("llm graph")
        artifacts["llm"], parity["llm"], spec = export_llm(model, out, args.max_context, args.prefill_chunk, dtype)
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
        manifest = build_hybrid_manifest("onnx", ckpt, args.model, artifacts, files, args,
                                         "float16" if args.dtype == "fp16" else "float32", parity, spec,
                                         {"prefill": {"artifact": "llm", "tokens": args.prefill_chunk},
                                          "decode": {"artifact": "llm", "tokens": 1}})
        write_manifest(out, manifest)
        steps.update()
    steps.close()
    print_summary(f"ONNX export of {ckpt.variant.name} -> {args.out}", rows)
    print("float weights (--quant none: int4 for the hybrid models is not yet supported)")
    print("note: text-only export: the vision step of MiniCPM-V 4.6 / 4.7 is not exported yet")
    return 0


def _size(out: Path, name: str) -> int:
    return sum(p.stat().st_size for p in out.glob(f"{name}*"))

