"""`python -m export.executorch` for the hybrid models (MiniCPM-V 4.6 / 4.7): one program with the one-slice vision
step and the LLM step, whose per-layer state lives in mutable buffers shared by its methods.

`export.executorch` dispatches here when the checkpoint's config.json names a hybrid model_type. `model.pte` holds:
- `vision_encoder`: `minicpm.hybrid_vision.HybridVisionStep`, one image slice per call at a fixed patch row of P =
  `--max-patches` patches (default: the checkpoint's processor bound, as the ONNX export): pixel_values
  [1,3,p,P*p], position_ids [P], patch_order [P], patch_mask [P] -> features [P/m, H]. `steps.vision` is the ONNX
  export's layout data (export.onnx_hybrid.vision_facts) plus the method name.
- `prefill` at T = --prefill-chunk and `text_decoder` at T = 1: `StatefulHybridStep` (export/stateful_hybrid.py),
  inputs inputs_embeds [1,T,H], position_ids [3,T] (M-RoPE rows), attention_mask [1,1,T,C+T], last_index [1],
  valid_tokens [1] -> logits [1,V]. Two static methods rather than one `text_decoder` over T = 1..chunk: the
  step's delta rule picks its sub-chunk size from T (min(16, T)) and loops over the sub-chunks in Python, so
  torch.export specialises T. Shorter calls (a last prefill chunk, a smaller chunk at run time) are padded to
  T = chunk by the backend; `valid_tokens` keeps the pad rows out of the state. With --prefill-chunk 1 only
  `text_decoder` is written.
- the state as mutable buffers under the `StateSpec` names: `past_keys` / `past_values` [L_full, kv_heads, C + S,
  head_dim] (S = prefill-chunk slack slots), `conv_state`, `recurrent_state` (float32), written in place after the
  step (one `index_copy_` of each whole KV buffer, `copy_` of the conv / recurrent state). Programs are written
  with `MemoryPlanningPass(share_mutable_buffers=True)` (export.executorch_lowering.lower_each): both methods read
  and write the same memory, so a conversation runs prefill and decode calls on one state;
  `emit_mutable_buffer_names` lets the backend zero the buffers by name (reset).
- the runner's constant methods (`get_max_seq_len` = the prefill chunk, `get_max_context_len`, `get_bos_id`,
  `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape` = false). No `token_embedding` method: the host reads
  `token_embedding.bin`, as for every format, and a method would store the table a second time (1 GB in float32
  for a 248k-row 4.7-1B table).

Memory: the torch modules' weights go to the meta device once traced (the parity references computed first), and
the methods are lowered one at a time, each method's traced weights dropped once its delegates hold their copy
(export.executorch_lowering.lower_each), so the whole float model is never held next to all its lowered copies.

Lowering: every op XNNPACK takes is delegated, after the edge passes of export.executorch_lowering (XNNPACK_PASSES)
that remove what cut the graph into many small subgraphs (XNNPACK preprocesses each one through ~17 graph passes: the
export time grows with their count). `drop_noop_expands`: torch.export spells each batched matmul as expand + view +
bmm + view, and the expands to the shape they already have are not XNNPACK ops. `mean_as_pooling`: the RMSNorms'
mean over the last axis is not an XNNPACK op, the same mean as a global average pool of a [1, rows, n, 1] view is.
The tiny 4.6's T = 128 step lowered as 97 subgraphs before, 18 after (the rest sit at index, cumsum, where and select
ops of the delta rule and the mask).

Parity: every method through executorch.runtime against its torch module: the step methods over the calls the
session makes (export.stateful_hybrid.schedule_calls, against the unmodified torch step with a host-held
`StateCache`, the buffers zeroed between the two conversations), the vision method on every slice of a sliced test
photo, the embedding on edge ids. XNNPACK only (`--backend coreml` is refused in one line).

Weights (`--quant int4-awq|int4-rtn`, none by default as for the older models, or a quantised directory from `python
-m quant.awq --symmetric`): the Qwen3.5 layers' symmetric int4 records (quant/layout.py; the delta-net gate
projections stay float) and, with `--lm-head int8`, the head's int8 record, installed exactly as export.executorch
writes the older models' (`prepare_model` + `install_records`: torchao weights holding the records' codes, scales
rounded to bfloat16 as XNNPACK stores them) and run as 8da4w (int8 dynamic per-token activations). Vision and the
embedding stay float32. The step methods' parity reference is then the torch step with those same torchao weights
(eager 8da4w); its activation codes are computed in another order than XNNPACK's, so a rounding tie flips a code and
the logits move by up to `QUANT_TOLERANCE` (the older models' 8da4w bound) instead of 1e-4.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from export.bundle import (
    build_hybrid_manifest,
    copy_model_files,
    file_entry,
    max_abs_error,
    staged_directory,
    write_embedding_table,
)
from export.onnx_hybrid import (
    HYBRID_FILES,
    VISION_IO,
    check_hybrid_arguments,
    open_hybrid,
    vision_examples,
    vision_facts,
)
from export.onnx_weights import MemoryStatus, memory_note
from export.stateful_hybrid import STEP_INPUTS, StatefulHybridStep, example_inputs, schedule_calls, state_description
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep
from minicpm.hybrid_vision import HybridVisionStep
from runtime.manifest import write_manifest

PROGRAM = "model.pte"
VISION_METHOD = "vision_encoder"
FLOAT_TOLERANCE = 1e-4  # max |error| of a float32 method against its torch module
QUANT_TOLERANCE = 0.5  # of an 8da4w step method against its eager torchao step (tests/test_executorch.py's bound)


def decoder_methods(chunk: int) -> dict[str, int]:
    """Method name -> tokens per call."""
    return {"prefill": chunk, "text_decoder": 1} if chunk > 1 else {"text_decoder": 1}


def build_methods(wrapper: StatefulHybridStep, vision: HybridVisionStep, vision_example: tuple, chunk: int) -> dict:
    """export.executorch `Method`s: the vision step and the decoder methods (all static)."""
    from export.executorch import Method  # noqa: PLC0415 (export.executorch dispatches to this module)

    methods = {VISION_METHOD: Method(vision, vision_example)}
    for name, tokens in decoder_methods(chunk).items():  # one module: the methods share its buffers
        methods[name] = Method(wrapper, example_inputs(wrapper.step, tokens, torch.float32))
    return methods


@torch.no_grad()
def parity_cases(reference: HybridLanguageModelStep, vision: HybridVisionStep, chunk: int, vision_inputs: list[tuple]
                 ) -> dict:
    """What `parity` compares the program with, computed while the torch modules still hold their weights: the
    session's calls (export.stateful_hybrid.schedule_calls) with their expected logits, every slice of the test
    photo with its features."""
    return {"calls": schedule_calls(reference, chunk, torch.float32),
            "vision": [(args, vision(*args)) for args in vision_inputs]}


def parity(path: Path, cases: dict, state_names: list[str], chunk: int) -> dict[str, float]:
    """Max |error| of each method against its torch module (`parity_cases`; see the module docstring)."""
    from export.executorch_parity import load_program  # noqa: PLC0415
    from runtime.backends.call_shapes import strided_tensor  # noqa: PLC0415

    program = load_program(path)
    names = decoder_methods(chunk)
    loaded = {name: program.load_method(name) for name in names}
    by_tokens = {tokens: name for name, tokens in names.items()}
    buffers = [loaded["text_decoder"]._method.get_attribute(n) for n in state_names]
    errors = dict.fromkeys(loaded, 0.0)
    for conversation in cases["calls"]:
        for buffer in buffers:  # a fresh conversation: the shared buffers zeroed through one method
            buffer.zero_()
        for tokens, inputs, expected in conversation:
            name = by_tokens[tokens]
            got = loaded[name].execute([strided_tensor(inputs[n].numpy()) for n in STEP_INPUTS])[0]
            errors[name] = max(errors[name], max_abs_error(got, expected))
    vision = program.load_method(VISION_METHOD)
    errors[VISION_METHOD] = max(max_abs_error(vision.execute(list(args))[0], features)
                                for args, features in cases["vision"])
    return errors


def method_specs(methods: dict, reference: HybridLanguageModelStep, chunk: int, features: torch.Tensor) -> dict:
    """The manifest's `artifacts.program.methods`: each method's inputs and outputs (delegation added after
    lowering)."""
    def tensors(names: list[str], example: tuple) -> list[dict]:
        return [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
                for n, x in zip(names, example, strict=True)]

    vocab = reference.config.vocab_size
    specs = {name: {"inputs": tensors(STEP_INPUTS, methods[name].example),
                    "outputs": [{"name": "logits", "shape": [1, vocab], "dtype": "float32"}]}
             for name in decoder_methods(chunk)}
    specs[VISION_METHOD] = {"inputs": tensors(VISION_IO[0], methods[VISION_METHOD].example),
                            "outputs": tensors(VISION_IO[1], (features,))}
    return specs


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole ExecuTorch export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.executorch, not yet
    checked: --max-patches defaults to the checkpoint's processor bound here)."""
    from export.executorch import export_methods, metadata_methods, prepare_model  # noqa: PLC0415
    from export.executorch_lowering import delegation, lower_each, method_bytes  # noqa: PLC0415
    from export.executorch_weights import (  # noqa: PLC0415
        VISION_INT8,
        collect,
        install_int8_vision,
        release_weights,
    )

    check_hybrid_arguments(args)
    if args.backend != "xnnpack":
        raise UserError(f"--backend {args.backend}: MiniCPM-V 4.6 / 4.7 ExecuTorch exports are XNNPACK only for now")
    seconds, memory = {}, {}
    t = time.perf_counter()
    ckpt = open_hybrid(args)
    # the older models' path: symmetric records (a directory's own, or quantised now, AWQ showing its own progress)
    # installed as torchao 8da4w weights; asymmetric directories are refused in one line
    model, quant, facts = prepare_model(ckpt, args.quant, args.group_size, args.backend, args.lm_head, args.samples,
                                        args.calib)
    model.requires_grad_(False)  # in-place buffer writes next to parameters: lowering refuses leaves needing grad
    seconds["load + quantise"] = time.perf_counter() - t
    memory["load + quantise"] = memory_note()
    tolerances = {name: QUANT_TOLERANCE if facts else FLOAT_TOLERANCE for name in decoder_methods(args.prefill_chunk)}
    chunk = args.prefill_chunk
    bar = tqdm(total=4, desc="export.executorch", unit="step")
    with MemoryStatus(bar) as status, staged_directory(args.out) as out:
        status("torch.export")
        t = time.perf_counter()
        reference = HybridLanguageModelStep(model, args.max_context, max_chunk=chunk).eval()
        wrapper = StatefulHybridStep(reference, slack=chunk).eval()
        mode = ckpt.processor.image_processor.downsample_mode  # the mode the processor counted placeholders with
        vision = HybridVisionStep(model, downsample_mode=mode).eval()
        vision_inputs = vision_examples(vision, ckpt, args.max_patches, torch.float32)
        int8_vision = args.vision_weights == "int8"
        if int8_vision:  # the float features first: the vision parity is against them (as export.onnx's)
            with torch.no_grad():
                float_features = [vision(*x) for x in vision_inputs]
            install_int8_vision(vision)
            tolerances[VISION_METHOD] = float("inf")  # int8 moves the features by design: reported, not refused
        methods = build_methods(wrapper, vision, vision_inputs[0], chunk)
        programs = export_methods(methods, undecomposed=tuple(decoder_methods(chunk)))  # no GELU in the step
        wrapper.reset()  # tracing ran the module
        cases = parity_cases(reference, vision, chunk, vision_inputs)
        if int8_vision:
            cases["vision"] = list(zip(vision_inputs, float_features, strict=True))
            del float_features
        specs = method_specs(methods, reference, chunk, cases["vision"][0][1])
        # the table once, in token_embedding.bin (no program method reads it; a tied head keeps its own reference)
        artifacts = {"token_embedding": write_embedding_table(None, out, torch.float32,
                                                              model.get_input_embeddings().weight)}
        # The exported programs hold the weights now: the eager ones go, and each method's traced copy after its
        # lowering (lower_each).
        release_weights(model, wrapper, vision)
        seconds["export"] = time.perf_counter() - t
        memory["export"] = memory_note()
        bar.update()
        status("lowering to xnnpack")
        t = time.perf_counter()
        metadata = metadata_methods(ckpt, args.max_context, chunk, dynamic=False)
        program, edge = lower_each(programs, "xnnpack", metadata, torch.float32)
        delegated = delegation(edge, "XnnpackBackend")
        for name, size in method_bytes(edge).items():
            delegated[name]["bytes"] = size
        path = out / PROGRAM
        with open(path, "wb") as f:  # from the serialised segments: `program.buffer` would join them in one copy
            program.write_to_file(f)
        del program, edge, programs
        collect()
        seconds["lower"] = time.perf_counter() - t
        memory["lower"] = memory_note()
        bar.update()
        status("parity")
        t = time.perf_counter()
        errors = parity(path, cases, reference.spec.names, chunk)
        del cases
        over = {name: error for name, error in errors.items() if error > tolerances.get(name, FLOAT_TOLERANCE)}
        if over:  # never write a program that answers differently from its torch modules
            raise UserError("the ExecuTorch program departs from its torch modules: " + ", ".join(
                f"{name} {error:.1e} (> {tolerances.get(name, FLOAT_TOLERANCE):.0e})" for name, error in over.items()))
        seconds["parity"] = time.perf_counter() - t
        memory["parity"] = memory_note()
        bar.update()
        status("tokenizer, manifest")
        for name, spec in specs.items():
            spec["delegation"] = delegated[name]
        artifacts["program"] = {**file_entry(out, PROGRAM), "format": "pte", "backend": "XnnpackBackend",
                                "methods": specs, "constant_methods": metadata}
        files = copy_model_files(ckpt, out, HYBRID_FILES)
        prefill = "prefill" if chunk > 1 else "text_decoder"
        steps = {"vision": {**vision_facts(vision, mode, args.max_patches), "artifact": "program",
                            "function": VISION_METHOD},
                 "prefill": {"artifact": "program", "function": prefill, "tokens": chunk},
                 "decode": {"artifact": "program", "function": "text_decoder", "tokens": 1}}
        manifest = build_hybrid_manifest("executorch", ckpt, args.model, artifacts, files, args, "float32", errors,
                                         wrapper.spec, steps, quant.manifest(**facts))
        if int8_vision:
            manifest["quantization"]["vision"] = VISION_INT8
        manifest["schedule"]["executorch"] = {
            "state": state_description(wrapper, "the program's mutable buffers zeroed in place by name"),
            "buffers": "program mutable buffers shared by the decoder methods (share_mutable_buffers)",
            "inputs": "a call of fewer tokens than a method's T is padded to it (valid_tokens = the real rows); "
                      f"{VISION_METHOD} takes one slice per call",
        }
        write_manifest(out, manifest)
        bar.update()
    bar.close()
    scheme = facts.get("scheme", "fp32")
    print(f"\nExecuTorch export (xnnpack, {scheme}) of {ckpt.variant.name} -> {args.out}")
    print(f"{'method':<18}{'max |err|':>11}{'subgraphs':>11}{'delegated':>11}{'portable':>10}"
          f"{'linear ops delegated':>22}{'MB':>9}")
    for name, d in delegated.items():
        print(f"{name:<18}{errors[name]:>11.2e}{d['subgraphs']:>11}{d['delegated_nodes']:>11}{d['portable_nodes']:>10}"
              f"{d['linear_delegated']:>17}/{d['linear_ops']:<4}{d['bytes'] / 1e6:>9.1f}")
    sizes = {name: entry["size"] for name, entry in artifacts.items()}
    print(f"{PROGRAM} {sizes['program']} bytes; token_embedding.bin {sizes['token_embedding']} bytes")
    print(quant.describe() + (f" as {scheme}, {quant.int8_layers} int8, group scales {facts['scale_dtype']} "
                              f"(largest relative rounding {facts['max_scale_rounding']:.1e})"
                              if facts else ""))
    for note in quant.notes:
        print(f"note: {note}")
    print(f"vision: {args.vision_weights} weights, one slice per call, {args.max_patches} patches "
          f"({steps['vision']['rows']} feature rows, "
          f"{mode} mode)")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    print("memory: " + "; ".join(f"{k}: {v}" for k, v in memory.items()))
    return 0
