"""`python -m export.coreai` for the hybrid models (MiniCPM-V 4.6 / 4.7): the one-slice vision step and the LLM step
with its per-layer state as Core AI state.

`export.coreai` dispatches here when the checkpoint's config.json names a hybrid model_type. Written:
- `vision.aimodel`, function `main`: `minicpm.hybrid_vision.HybridVisionStep`, one slice per call at a fixed patch
  row of P = `--max-patches` patches (default: the processor's bound, as the ONNX export). Inputs pixel_values
  [1,3,p,P*p], position_ids [P], patch_order [P], patch_mask [P] -> features [P/m, H]; `steps.vision` is the ONNX
  export's layout data (export.onnx_hybrid.vision_facts) plus the function name. Parity: the asset through the
  runtime against the torch step on every slice of a sliced test photo.
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
runs x @ [in, out] much faster). int4 (`--quant int4-awq|int4-rtn`, the default as for the older models, or a
quantised directory from `python -m quant.awq`): the Qwen3.5 layers' records (quant/layout.py) as ui4 codes through
`constexpr_blockwise_shift_scale`, exactly as export.coreai writes them (`--lm-head int8`: the head as ui8).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
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
from export.onnx_hybrid import (
    HYBRID_FILES,
    VISION_IO,
    check_hybrid_arguments,
    open_hybrid,
    vision_examples,
    vision_facts,
)
from export.stateful_hybrid import STEP_INPUTS, StatefulHybridStep, example_inputs, schedule_calls, state_description
from minicpm.hybrid_step import HybridLanguageModelStep
from minicpm.hybrid_vision import HybridVisionStep
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


@torch.no_grad()
def export_vision(model: nn.Module, ckpt: HybridCheckpoint, out: Path, max_patches: int, dtype: torch.dtype
                  ) -> tuple[Path, dict, float, dict]:
    """vision.aimodel (function main); its I/O, the max |error| through the Core AI runtime against the torch step
    on every slice of a sliced test photo, and `steps.vision` (the ONNX export's layout data)."""
    mode = ckpt.processor.image_processor.downsample_mode  # the mode the processor counted placeholders with
    step = HybridVisionStep(model, downsample_mode=mode).eval()
    examples = vision_examples(step, ckpt, max_patches, dtype)
    path = save_asset({"main": export_program(step, examples[0])}, out / "vision.aimodel", *VISION_IO)
    error = 0.0
    with AssetRunner(path) as runner:
        for args in examples:
            got = runner("main", {n: a.numpy() for n, a in zip(VISION_IO[0], args, strict=True)})["features"]
            error = max(error, max_abs_error(got.astype(np.float32), step(*args).float().numpy()))
        io = {"main": runner.describe("main")}
    return path, io, error, vision_facts(step, mode, max_patches)


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole Core AI export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.coreai)."""
    from export.coreai import (  # noqa: PLC0415 (export.coreai dispatches to this module)
        FORMAT,
        asset_entry,
        install_records,
        peak_rss_mb,
        prepare_model,
        transpose_linears,
        tree_size,
    )

    check_hybrid_arguments(args)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    dtype_name = "float16" if dtype == torch.float16 else "float32"
    ckpt = open_hybrid(args)
    # int4 / int8 records from quant/ written as ui4 / ui8 codes, as export.coreai does for the older models
    model, records, quant = prepare_model(ckpt, args.quant, args.group_size, args.lm_head, args.samples, args.calib)
    install_records(model, records, torch.float32)  # checked against the float32 weights, then cast with the model
    table = model.get_input_embeddings().weight.detach().clone()
    transpose_linears(model)  # same arithmetic, stored [in, out] (see export.coreai.TransposedLinear)
    model.to(dtype)
    progress = tqdm(total=4, desc="export.coreai", unit="step")
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        progress.set_postfix_str("vision asset")
        vision, vision_io, parity["vision"], vision_step = export_vision(model, ckpt, out, args.max_patches, dtype)
        rows.append(("vision.aimodel", tree_size(vision), parity["vision"], time.perf_counter() - t))
        artifacts["vision"] = asset_entry(vision, vision_io)
        progress.update()
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
        steps = {"vision": {**vision_step, "function": "main"},
                 "prefill": {"artifact": "llm", "function": "prefill", "tokens": args.prefill_chunk},
                 "decode": {"artifact": "llm", "function": "decode", "tokens": 1}}
        manifest = build_hybrid_manifest("coreai", ckpt, args.model, artifacts, files, args, dtype_name, parity,
                                         wrapper.spec, steps, quant.manifest(**({"format": FORMAT} if records else {})))
        manifest["schedule"]["coreai"] = {
            "state": state_description(wrapper, "fresh zeroed state arrays; both functions get the same arrays"),
            "inputs": "float inputs in the model dtype, position_ids / patch_order / last_index / valid_tokens "
                      "int32; a call of fewer tokens than a function's T is padded to it (valid_tokens = the real "
                      "rows); the vision asset takes one slice per call",
        }
        write_manifest(out, manifest)
        progress.update()
    progress.close()
    print_summary(f"Core AI export of {ckpt.variant.name} -> {args.out} ({args.precision}; max |err| "
                  "measured through the Core AI runtime)", rows)
    print(f"{quant.describe()}; peak RSS {peak_rss_mb():.0f} MB")
    print(f"vision: one slice per call, {args.max_patches} patches ({vision_step['rows']} feature rows, "
          f"{vision_step['downsample_mode']} mode)")
    return 0
