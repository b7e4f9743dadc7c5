"""`python -m export.coreai` for the hybrid models (MiniCPM-V 4.6 / 4.7): the LLM step with its per-layer state as
Core AI state.

`export.coreai` dispatches here when the checkpoint's config.json names a hybrid model_type. Written:
- `llm.aimodel`, functions `prefill` (T = --prefill-chunk) and `decode` (T = 1) of one program, sharing weights
  (constants are uniqued by content, as for the older models' LLM asset). Both are `StatefulHybridStep`
  (export/stateful_hybrid.py) traced at a static T: inputs inputs_embeds [1,T,H], position_ids [3,T] (M-RoPE rows),
  attention_mask [1,1,T,C+T], last_index [1], valid_tokens [1] -> logits [1,V]. Static shapes because the step's
  delta rule loops over its sub-chunks in Python (their count follows T) and Core AI states take no flexible
  shapes; a call with fewer tokens is padded to the prefill width by the backend (valid_tokens keeps the pad rows
  out of the state).
- States: one per `StateTensor`, under the `StateSpec` names: `past_keys` / `past_values` [L_full, kv_heads,
  C + S, head_dim] (S = prefill-chunk slack slots), `conv_state`, `recurrent_state` (float32). The runtime takes
  the state arrays with every call and updates them in place; both functions get the same arrays, and zeroed
  arrays are a new conversation. The session sends no state and keeps only the token count (`owns_state`).
- `token_embedding.bin`, tokenizer + processor files, `manifest.json` with `schedule.state` (= `StateSpec.to_dict()`,
  as for ONNX) and `schedule.coreai.state` (the backend owns the state: buffer shapes, slack, write rule).
Parity: the asset through the Core AI runtime against the unmodified torch step with a host-held `StateCache`, over
the calls the session makes (export.stateful_hybrid.schedule_calls), both functions sharing one set of arrays.

Weights: float (fp32 by default; `--precision fp16` writes fp16 weights, activations and KV / conv state, the
recurrent state stays float32), every Linear stored transposed as export.coreai does (the Linux CPU runtime
runs x @ [in, out] much faster). `--quant` other than none is refused in one line (int4 of the gated delta-net
projections needs the Qwen3.5 layout in quant/). Text only, as the ONNX hybrid export, until a vision step lands.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.bundle import (
    build_hybrid_manifest,
    copy_model_files,
    max_abs_error,
    print_summary,
    staged_directory,
    write_embedding_table,
)
from export.coreai_asset import AssetRunner, export_program, save_asset
from export.onnx_hybrid import HYBRID_FILES, check_hybrid_arguments
from export.stateful_hybrid import STEP_INPUTS, StatefulHybridStep, example_inputs, schedule_calls, state_description
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep
from minicpm.v4_6 import HybridCheckpoint
from runtime.manifest import write_manifest

FUNCTIONS = {"prefill": None, "decode": 1}  # tokens per call (prefill: --prefill-chunk)


def new_state(runner: AssetRunner, wrapper: StatefulHybridStep) -> dict:
    """Zeroed state arrays (a fresh conversation), each in its own dtype (the recurrent state is float32)."""
    from coreai.runtime import NDArray  # noqa: PLC0415

    return {t.name: NDArray(np.zeros(wrapper.state_shapes[t.name], dtype=t.dtype)) for t in wrapper.spec.tensors}


def function_of(tokens: int, chunk: int) -> str:
    return "decode" if tokens == 1 and chunk != 1 else "prefill"


@torch.no_grad()
def export_llm(wrapper: StatefulHybridStep, reference: HybridLanguageModelStep, out: Path, chunk: int,
               dtype: torch.dtype, progress: tqdm) -> tuple[Path, dict, float]:
    """llm.aimodel; its functions' I/O and the max |logit error| through the runtime against the torch step."""
    programs = {}
    for name, tokens in FUNCTIONS.items():
        tokens = tokens or chunk
        progress.set_postfix_str(f"llm {name} (T={tokens}): torch.export")
        programs[name] = export_program(wrapper, example_inputs(wrapper.step, tokens, dtype))
        wrapper.reset()  # tracing ran the module: keep its buffers a fresh conversation
    progress.set_postfix_str("llm: converting prefill + decode")
    path = save_asset(programs, out / "llm.aimodel", STEP_INPUTS, ["logits"], wrapper.state_names)
    del programs
    gc.collect()
    progress.set_postfix_str("llm: parity through the Core AI runtime")
    error = 0.0
    with AssetRunner(path) as runner:
        for conversation in schedule_calls(reference, chunk, dtype):
            state = new_state(runner, wrapper)
            for tokens, inputs, expected in conversation:
                got = runner(function_of(tokens, chunk), {k: v.numpy() for k, v in inputs.items()}, state)["logits"]
                error = max(error, max_abs_error(got.astype(np.float32), expected.float().numpy()))
        io = {name: runner.describe(name) for name in FUNCTIONS}
    return path, io, error


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole Core AI export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.coreai)."""
    from export.coreai import asset_entry, peak_rss_mb, transpose_linears, tree_size  # noqa: PLC0415 (dispatcher)

    check_hybrid_arguments(args)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    dtype_name = "float16" if dtype == torch.float16 else "float32"
    ckpt = HybridCheckpoint.open(args.model)
    if (ckpt.path / "quant_config.json").is_file():
        raise UserError(f"{ckpt.path}: quantised MiniCPM-V 4.6 / 4.7 checkpoints are not yet supported by the Core AI "
                        "exporter")
    model, _ = ckpt.load_model("float32")
    table = model.get_input_embeddings().weight.detach().clone()
    transpose_linears(model)  # same arithmetic, stored [in, out] (see export.coreai.TransposedLinear)
    model.to(dtype)
    progress = tqdm(total=3, desc="export.coreai", unit="step")
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        reference = HybridLanguageModelStep(model, args.max_context, max_chunk=args.prefill_chunk).eval()
        wrapper = StatefulHybridStep(reference, slack=args.prefill_chunk).eval()
        llm, io, parity["llm"] = export_llm(wrapper, reference, out, args.prefill_chunk, dtype, progress)
        rows.append(("llm.aimodel (prefill+decode)", tree_size(llm), parity["llm"], time.perf_counter() - t))
        artifacts["llm"] = {**asset_entry(llm, io), "default_function": "decode"}
        progress.update()
        progress.set_postfix_str("embedding table, tokenizer, processor")
        t = time.perf_counter()
        artifacts["token_embedding"] = write_embedding_table(None, out, dtype, table)
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out, HYBRID_FILES)
        progress.update()
        progress.set_postfix_str("manifest")
        steps = {"prefill": {"artifact": "llm", "function": "prefill", "tokens": args.prefill_chunk},
                 "decode": {"artifact": "llm", "function": "decode", "tokens": 1}}
        manifest = build_hybrid_manifest("coreai", ckpt, args.model, artifacts, files, args, dtype_name, parity,
                                         wrapper.spec, steps)
        manifest["schedule"]["coreai"] = {
            "state": state_description(wrapper, "fresh zeroed state arrays; both functions get the same arrays"),
            "inputs": "float inputs in the model dtype, position_ids / last_index / valid_tokens int32; a call of "
                      "fewer tokens than a function's T is padded to it (valid_tokens = the real rows)",
        }
        write_manifest(out, manifest)
        progress.update()
    progress.close()
    print_summary(f"Core AI export of {ckpt.variant.name} -> {args.out} (float, {args.precision}; max |err| "
                  "measured through the Core AI runtime)", rows)
    print(f"float weights (--quant none: int4 for the hybrid models is not yet supported); peak RSS "
          f"{peak_rss_mb():.0f} MB")
    print("note: text-only export: the vision step of MiniCPM-V 4.6 / 4.7 is not exported yet")
    return 0
