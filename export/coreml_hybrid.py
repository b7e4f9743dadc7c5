"""`python -m export.coreml` for the hybrid models (MiniCPM-V 4.6 / 4.7): the one-slice vision step and the LLM step
with its per-layer state as Core ML state.

`export.coreml` dispatches here when the checkpoint's config.json names a hybrid model_type. Written (ML programs
for iOS 18 / macOS 15, as the older models' packages: they convert on Linux and run only on Apple platforms):
- `vision.mlpackage`, function main: `minicpm.hybrid_vision.HybridVisionStep`, one slice per call at a fixed patch
  row of P = `--max-patches` patches (default: the processor's bound, as the ONNX export). Inputs pixel_values
  [1,3,p,P*p], position_ids [P] int32, patch_order [P] int32, patch_mask [P] -> features [P/m, H]. The manifest's
  `steps.vision` is the ONNX export's layout data (export.onnx_hybrid.vision_facts). Float weights, never quantised.
- `llm.mlpackage`: ONE package, functions `prefill` (T = --prefill-chunk) and `decode` (T = 1) sharing one copy of
  the weights (multifunction), both `CoreMLHybridStep` traced at a static T (the delta rule loops over sub-chunks
  in Python, and Core ML states take no flexible shapes). Inputs inputs_embeds [1,T,H], position_ids [3,T] int32
  (M-RoPE rows), attention_mask [1,1,T,C+T], last_index [1] int32, valid_tokens [1] int32 -> logits [1,V]; a call of
  fewer tokens is padded to the prefill width by the backend (valid_tokens keeps the pads out of the state).
- States (float16: the only dtype Core ML states take), shared by both functions through one `make_state()`:
  `k_cache_{i}` / `v_cache_{i}` [1, kv_heads, C + S, head_dim] per full-attention layer i (one state per layer and
  tensor, as the older models' cache: each write touches only its own state), `conv_state` [L_lin, conv_dim,
  kernel - 1] and `recurrent_state` [L_lin, value_heads, key_dim, value_dim] (the `StateSpec` tensors, replaced
  whole). `schedule.state` is the spec (= the ONNX export's); `schedule.coreml.state` says how the package holds it.
- `token_embedding.bin`, tokenizer + processor files, `manifest.json`.

KV writes: the T new rows go to slots start + [0, T) by `slice_scatter` at `start.item()` (read_state ->
slice_update -> coreml_update_state; coremltools does not convert `index_copy_`, which the Core AI wrapper uses),
start = the cache columns the first row of the host's mask sees (M-RoPE positions are not slots). The mask is moved
onto the state the same way (new tokens' columns at their slots, the S slack slots masked), so the host builds
exactly the mask it builds for ONNX.

Precision: fp16 weights and compute by default; RMSNorm (plain and gated) and the chunked gated delta rule stay
float32 inside the fp16 program, as transformers computes them. The recurrent state is
stored float16 between calls. Linux cannot run the packages, so parity is measured on the module that is converted
(float32 compute): `parity.llm` with its float16 states, `parity.llm_fp32_state` with the same graph on float32
states, both against the unmodified torch step with a host-held StateCache over the session's calls;
`parity.vision` the exported vision program against the eager step on every slice of a sliced photo.

Weights: int4 records from quant/ (`--quant int4-awq|int4-rtn`, AWQ by default as for the older models, or a
quantised directory from `python -m quant.awq`) for the Qwen3.5 layers' Linears (quant/layout.py; the delta-net gate
projections stay float), written exactly as export.coreml writes the older models' (export/coreml_weights.py:
each installed as a `BlockwiseLinear`, written as `constexpr_blockwise_shift_scale` holding the records' codes,
fp16 scales and zero points bit for bit); `--lm-head int8` (the default when quantising) the head's per-row int8
record the same way. The vision package stays float. The float32 islands are untouched (no quantised Linear lies
inside one). The parity reference is the torch step of the model with the same quantised weights installed.
"""

from __future__ import annotations

import argparse
import gc
import shutil
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
from export.coreml_package import (
    GENERATOR,
    convert,
    export_program,
    import_coremltools,
    np_float,
    package_entry,
    peak_rss_mb,
    save_llm_function,
    save_package,
    tag_fp32,
    tree_size,
)
from export.coreml_weights import install_records, prepare_model
from export.onnx_hybrid import (
    HYBRID_FILES,
    VISION_IO,
    check_hybrid_arguments,
    open_hybrid,
    vision_examples,
    vision_facts,
)
from export.stateful_hybrid import example_inputs, schedule_calls
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep
from minicpm.hybrid_vision import HybridVisionStep
from minicpm.v4_6 import HybridCheckpoint
from runtime.manifest import write_manifest

MASK_FILL = -65504.0  # slack columns: the most negative fp16 (finite; exact zero weight after softmax)
FP32_MODULES = ("RMSNorm", "DeltaRuleModule")  # module classes whose ops the fp16 pass leaves in float32


class DeltaRuleModule(nn.Module):
    """The step's delta rule called as a module: its nodes then carry a module scope that `keep_fp32` can select
    (torch.export keeps no deeper stack frames than the wrapper's forward)."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rule(*args)


class CoreMLHybridStep(nn.Module):
    """`HybridLanguageModelStep` with its state in buffers that become Core ML states (see the module docstring).

    Run eagerly it is the exact PyTorch reference of both converted functions (one set of buffers, as one
    `make_state()` on device). `state_dtype`: float16 for the package; float32 measures what the fp16 state costs.
    """

    def __init__(self, step: HybridLanguageModelStep, slack: int, state_dtype: torch.dtype = torch.float16):
        super().__init__()
        # Same function, now with a module scope: registered, and set on the instance over the class's staticmethod.
        step.add_module("delta_rule_module", DeltaRuleModule(type(step).delta_rule))
        object.__setattr__(step, "delta_rule", step.delta_rule_module)
        self.step, self.spec = step.eval(), step.spec
        self.max_context, self.slack = step.max_context, slack
        for name, shape in self.state_shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=state_dtype), persistent=False)

    @property
    def full_layers(self) -> int:
        return self.spec["past_keys"].shape[0] if "past_keys" in self.spec.names else 0

    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-layer KV states with S slack slots, then the spec's replaced tensors as they are."""
        shapes = {}
        if self.full_layers:
            _, heads, slots, head_dim = self.spec["past_keys"].shape
            for i in range(self.full_layers):
                for kind in ("k", "v"):
                    shapes[f"{kind}_cache_{i}"] = (1, heads, slots + self.slack, head_dim)
        shapes.update({t.name: tuple(t.shape) for t in self.spec.tensors if t.update == "replace"})
        return shapes

    @property
    def state_names(self) -> list[str]:
        return list(self.state_shapes)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor, valid_tokens: torch.Tensor) -> torch.Tensor:
        tokens, context = inputs_embeds.shape[1], self.max_context
        # the cached tokens = the cache columns the first row sees (0 = visible in the host's additive mask)
        start = (attention_mask[0, 0, 0, :context] == 0).to(torch.int32).sum().item()  # int32: an integer slot in MIL
        torch._check(start >= 0)
        torch._check(start <= context + self.slack - tokens)
        # keys [C slots | T new] -> [C slots | S slack], the new tokens' columns at their slots
        mask = torch.cat([attention_mask[..., :context],
                          torch.full((1, 1, tokens, self.slack), MASK_FILL, dtype=attention_mask.dtype)], dim=-1)
        mask = torch.slice_scatter(mask, attention_mask[..., context:], dim=3, start=start, end=start + tokens)

        def attend_over(i: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            # slice_scatter + copy_: read_state -> slice_update(begin = start) -> coreml_update_state
            keys.copy_(torch.slice_scatter(keys, key.to(keys.dtype), dim=2, start=start, end=start + tokens))
            values.copy_(torch.slice_scatter(values, value.to(values.dtype), dim=2, start=start, end=start + tokens))
            return keys.to(key.dtype), values.to(value.dtype)

        outputs = self.step.run_layers(inputs_embeds, position_ids, mask, last_index, valid_tokens, attend_over,
                                       getattr(self, "conv_state", None), getattr(self, "recurrent_state", None))
        for t, new in zip(self.spec.tensors, outputs[1:], strict=True):
            if t.update == "replace":  # the KV rows are written above, layer by layer
                state = getattr(self, t.name)
                state.copy_(new.to(state.dtype))
        return outputs[0]

    def reset(self) -> None:
        """Zero every state (what a fresh `make_state()` is on device)."""
        for name in self.state_names:
            getattr(self, name).zero_()


def prepare_for_converter(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Two graph edits coremltools 9 needs, same values: `aten.alias` nodes (a full-length slice, e.g. the delta
    rule's `[:, :tokens]` at T = its chunk) are replaced by their input (no converter for them), and the logits node
    moves to the end, after the last state value (its pass `canonicalize_inplace_pattern` fails when the op right
    before the state writes produces a state value: here the stacked recurrent state)."""
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    output = graph.output_node()
    logits = program.graph_signature.user_outputs[0]
    output.prepend(next(n for n in graph.nodes if n.name == logits))
    graph.lint()
    return program


def keep_fp32(node) -> bool:
    """Nodes the fp16 pass leaves in float32: RMSNorm modules (plain and gated) and the chunked delta rule."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(name in str(entry[1]) for entry in stack.values() for name in FP32_MODULES)


# ---------------------------------------------------------------------------------------------------------
# LLM
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def llm_error(wrapper: CoreMLHybridStep, reference: HybridLanguageModelStep, chunk: int) -> float:
    """Max |logit difference| of the stateful module against the torch step with a host-held StateCache, over
    `schedule_calls` (the session's calls: full chunks, decodes, padded chunks, pads in the slack)."""
    error = 0.0
    for conversation in schedule_calls(reference, chunk, torch.float32):
        wrapper.reset()
        for _, inputs, expected in conversation:
            error = max(error, max_abs_error(wrapper(**inputs), expected))
    wrapper.reset()
    return error


def export_llm_functions(ct, wrapper: CoreMLHybridStep, parts: Path, args: argparse.Namespace,
                         progress: tqdm) -> dict[str, Path]:
    """Convert prefill and decode one at a time into single-function packages in `parts`."""
    floating = np_float(args)
    hidden, context = wrapper.step.config.hidden_size, wrapper.max_context
    paths = {}
    for name, tokens in (("prefill", args.prefill_chunk), ("decode", 1)):
        progress.set_postfix_str(f"llm {name} (T={tokens}): torch.export")
        program = prepare_for_converter(export_program(wrapper, example_inputs(wrapper.step, tokens, torch.float32)))
        wrapper.reset()  # tracing ran the module: keep its buffers a fresh conversation
        if args.precision == "fp16" and not tag_fp32(program, keep_fp32):
            raise UserError("found no RMSNorm modules to keep in float32 (unexpected LLM layout)")
        inputs = [ct.TensorType(name="inputs_embeds", shape=(1, tokens, hidden), dtype=floating),
                  ct.TensorType(name="position_ids", shape=(3, tokens), dtype=np.int32),
                  ct.TensorType(name="attention_mask", shape=(1, 1, tokens, context + tokens), dtype=floating),
                  ct.TensorType(name="last_index", shape=(1,), dtype=np.int32),
                  ct.TensorType(name="valid_tokens", shape=(1,), dtype=np.int32)]
        progress.set_postfix_str(f"llm {name} (T={tokens}): converting")
        paths[name] = save_llm_function(ct, program, inputs, args, parts / f"{name}.mlpackage")
        del program
        gc.collect()
        progress.update()
    return paths


def coreml_state(wrapper: CoreMLHybridStep) -> dict:
    """`schedule.coreml.state`: the package owns the state; its states and how they map onto `schedule.state`."""
    of = {f"{kind}_cache_{i}": f"{'past_keys' if kind == 'k' else 'past_values'}[{i}]"
          for i in range(wrapper.full_layers) for kind in ("k", "v")}
    return {
        "owner": "backend",
        "names": wrapper.state_names,
        "tensors": {n: {"shape": list(s), "dtype": "float16", "of": of.get(n, n),
                        "update": "append" if n in of else "replace"} for n, s in wrapper.state_shapes.items()},
        "slack_slots": wrapper.slack,
        "write_position": "KV: the T new rows go to slots start + [0, T) of k_cache_{i} / v_cache_{i}, start = the "
                          "cache columns the first row of the attention mask sees (the cached tokens); conv / "
                          "recurrent: replaced whole",
        "attention_mask": "[1,1,T,C+T] additive, as for ONNX; the graph moves the new tokens' columns onto their "
                          "slots and masks the slack",
        "reset": "a fresh make_state() (zeros) per conversation; both functions share it",
        "host": "the session keeps only the token count (masks, positions, context-full); it sends no state "
                "inputs and gets the logits only",
    }


# ---------------------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def export_vision(ct, model: nn.Module, ckpt: HybridCheckpoint, out: Path, args: argparse.Namespace,
                  metadata: dict) -> tuple[Path, float, dict]:
    """vision.mlpackage; the max |error| of the exported program against the eager step on every slice of a sliced
    photo, and `steps.vision`."""
    mode = ckpt.processor.image_processor.downsample_mode  # the mode the processor counted placeholders with
    step = HybridVisionStep(model, downsample_mode=mode).eval()
    examples = vision_examples(step, ckpt, args.max_patches, torch.float32)
    program = export_program(step, examples[0])
    traced = program.module()
    error = max(max_abs_error(traced(*e), step(*e)) for e in examples)
    del traced
    p, patches, floating = step.layout.patch_size, args.max_patches, np_float(args)
    inputs = [ct.TensorType(name="pixel_values", shape=(1, 3, p, patches * p), dtype=floating),
              ct.TensorType(name="position_ids", shape=(patches,), dtype=np.int32),
              ct.TensorType(name="patch_order", shape=(patches,), dtype=np.int32),
              ct.TensorType(name="patch_mask", shape=(patches,), dtype=floating)]
    mlmodel = convert(ct, program, inputs, [ct.TensorType(name=VISION_IO[1][0], dtype=floating)], args,
                      fp32_ops=False, what="vision step")
    del program
    path = out / "vision.mlpackage"
    facts = vision_facts(step, mode, patches)
    save_package(mlmodel, path, f"MiniCPM-V vision: one slice (patch row of {patches}) -> {facts['rows']} x H "
                 "features", {**metadata, "function": "vision", "max_patches": patches, "ane_variant": args.ane_vision})
    return path, error, facts


# ---------------------------------------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------------------------------------


def export_hybrid(args: argparse.Namespace) -> int:
    """The whole Core ML export of a MiniCPM-V 4.6 / 4.7 checkpoint (`args` parsed by export.coreml; --max-patches
    defaults to the checkpoint's processor bound here)."""
    from export.coreml import COMPRESSION, merge_functions  # noqa: PLC0415 (export.coreml dispatches here)

    check_hybrid_arguments(args)
    ct = import_coremltools()
    ckpt = open_hybrid(args)
    # Quantising (AWQ shows its own progress) comes before the progress bar, as in export.coreml. The model is float32
    # with the records' dequantised weights installed: traced in float32, the converter casts to fp16 itself.
    model, records, quant = prepare_model(ckpt, args.quant, args.group_size, args.lm_head, args.samples,
                                          args.seq_len, args.calib)
    install_records(model, records, half=args.precision == "fp16")  # each checked, then held as its codes
    del records
    progress = tqdm(total=5, desc="export.coreml", unit="step")
    dtype_name = "float16" if args.precision == "fp16" else "float32"
    metadata = {"generator": GENERATOR, "model": args.model, "variant": ckpt.variant.name,
                "precision": args.precision, "target": args.target, "quantization": quant.method,
                "group_size": quant.group_size or "-", "lm_head": quant.lm_head}
    rows, parity, artifacts = [], {}, {}
    with staged_directory(args.out) as out:
        t = time.perf_counter()
        progress.set_postfix_str("vision package")
        vision, parity["vision"], vision_step = export_vision(ct, model, ckpt, out, args, metadata)
        rows.append(("vision.mlpackage", tree_size(vision), parity["vision"], time.perf_counter() - t))
        progress.update()

        progress.set_postfix_str("embedding table, tokenizer, processor")
        t = time.perf_counter()
        table_dtype = torch.float16 if args.precision == "fp16" else torch.float32
        table = model.get_input_embeddings().weight
        artifacts["token_embedding"] = write_embedding_table(None, out, table_dtype, table)
        rows.append(("token_embedding.bin", artifacts["token_embedding"]["size"], None, time.perf_counter() - t))
        files = copy_model_files(ckpt, out, HYBRID_FILES)
        progress.update()

        t = time.perf_counter()
        progress.set_postfix_str("llm: parity of the converted module")
        reference = HybridLanguageModelStep(model, args.max_context, max_chunk=args.prefill_chunk).eval()
        parity["llm_fp32_state"] = llm_error(CoreMLHybridStep(reference, args.prefill_chunk, torch.float32),
                                             reference, args.prefill_chunk)
        wrapper = CoreMLHybridStep(reference, args.prefill_chunk).eval()
        parity["llm"] = llm_error(wrapper, reference, args.prefill_chunk)
        parts_dir = out / ".functions"
        parts_dir.mkdir()
        parts = export_llm_functions(ct, wrapper, parts_dir, args, progress)
        state = coreml_state(wrapper)
        spec = wrapper.spec
        del wrapper, reference, model
        gc.collect()
        progress.set_postfix_str("llm: multifunction package")
        llm = out / "llm.mlpackage"
        merge_functions(ct, parts, llm, "decode", "MiniCPM-V 4.6 / 4.7 LLM: functions prefill (T = prefill chunk) and "
                        "decode (T = 1), per-layer state (KV, conv, recurrent) as Core ML state",
                        {**metadata, "functions": "prefill,decode", "prefill_chunk": args.prefill_chunk,
                         "max_context": args.max_context, "states": ",".join(state["names"])})
        shutil.rmtree(parts_dir)
        rows.append(("llm.mlpackage (prefill+decode)", tree_size(llm), parity["llm"], time.perf_counter() - t))

        progress.set_postfix_str("manifest")
        artifacts["vision"] = package_entry(out, vision)
        artifacts["llm"] = package_entry(out, llm)
        steps = {"vision": vision_step,
                 "prefill": {"artifact": "llm", "function": "prefill", "tokens": args.prefill_chunk},
                 "decode": {"artifact": "llm", "function": "decode", "tokens": 1}}
        written = quant.int4_layers + quant.int8_layers
        manifest = build_hybrid_manifest("coreml", ckpt, args.model, artifacts, files, args, dtype_name, parity,
                                         spec, steps, quant.manifest(**COMPRESSION if written else {}))
        manifest["schedule"]["coreml"] = {
            "target": args.target,
            "compute_units": {"vision": "cpu_and_ne" if args.ane_vision else args.compute_units,
                              "llm": args.compute_units},
            "ane_vision": args.ane_vision,
            "state": state,
            "inputs": "float inputs in the model dtype, position_ids / patch_order / last_index / valid_tokens int32; "
                      "a call of fewer tokens than a function's T is padded to it (valid_tokens = the real rows); the "
                      "vision package takes one slice per call",
        }
        write_manifest(out, manifest)
        progress.update()
    progress.close()
    print_summary(f"Core ML export of {ckpt.variant.name} -> {args.out} ({quant.method}, {args.precision}, "
                  f"{args.target}; max |err| of the converted modules against the torch step of the same weights, "
                  "float32 compute: Core ML runs on Apple platforms only)", rows)
    print(f"{quant.describe()}; state float16 (llm {parity['llm']:.2e}, with float32 state "
          f"{parity['llm_fp32_state']:.2e}); peak RSS {peak_rss_mb():.0f} MB")
    for note in quant.notes:
        print(f"note: {note}")
    return 0
