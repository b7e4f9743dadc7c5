"""coremltools plumbing for export.coreml: a quiet import and conversion, torch.export for the converter, the fp32
tags that keep RMSNorm out of the fp16 pass, and the packages' metadata, permissions, size and manifest entry."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minicpm.errors import UserError
from runtime.manifest import sha256_tree

GENERATOR = "minicpm-mobile 0.1.0"
KEEP_FP32 = "minicpm-mobile: keep fp32"  # tag put on RMSNorm nodes; the fp16 pass leaves tagged ops alone


def import_coremltools():
    """coremltools, imported quietly (it logs warnings about optional frontends it does not need here)."""
    names = ("coremltools", "torchao", "torch.utils._pytree")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import coremltools as ct  # noqa: PLC0415
    except ImportError:
        raise UserError("coremltools is not installed: pip install coremltools==9.0") from None
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
    if not ct.__version__.startswith("9."):
        raise UserError(f"this exporter is written for coremltools 9.x, found {ct.__version__}")
    from export.coreml_weights import register_converter  # noqa: PLC0415 (the records' constexpr op)

    register_converter()
    return ct


@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
    """Silence the converter's own progress bars and warnings; our bar says what is converting."""
    from functools import partial  # noqa: PLC0415

    import coremltools.converters.mil.frontend.torch.ops as torch_ops  # noqa: PLC0415
    import coremltools.converters.mil.mil.passes.pass_pipeline as pipeline  # noqa: PLC0415

    patched = [(m, a, getattr(m, a)) for m, a in ((torch_ops, "_tqdm"), (pipeline, "tqdm")) if hasattr(m, a)]
    for module, attr, original in patched:
        setattr(module, attr, partial(original, disable=True))
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_program(module: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """torch.export (non-strict) decomposed to core ATen: what coremltools' torch.export frontend reads. Static
    shapes throughout: each function is exported at its own T."""
    try:
        with torch.no_grad(), quiet_converter():
            return torch.export.export(module, args, strict=False).run_decompositions({})
    except Exception as e:  # noqa: BLE001 (one line for the user; the cause stays chained for debugging)
        raise UserError(f"torch.export cannot trace {type(module).__name__}: {first_line(e)}") from e


def in_rmsnorm(node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(str(entry[1]).endswith("RMSNorm") for entry in stack.values())


def tag_fp32(program: torch.export.ExportedProgram, select: Callable = in_rmsnorm) -> int:
    """Tag the nodes `select` picks (default: those of every *RMSNorm module): coremltools keeps a node's stack
    trace as the op's scope, and the fp16 pass's op selector (`keep_fp32`) leaves tagged ops in float32. Returns the
    number tagged."""
    tagged = 0
    for node in program.graph.nodes:
        if select(node):
            node.meta["stack_trace"] = f"{KEEP_FP32}\n{node.meta.get('stack_trace') or ''}"
            tagged += 1
    return tagged


def keep_fp32(op) -> bool:
    """op_selector of FP16ComputePrecision: True = compute in fp16."""
    from coremltools.converters.mil.mil.scope import ScopeSource  # noqa: PLC0415

    traces = getattr(op, "scopes", {}).get(ScopeSource.EXIR_STACK_TRACE, [])
    return not any(trace is not None and KEEP_FP32 in str(trace) for trace in traces)


def convert(ct, program, inputs: list, outputs: list, args: argparse.Namespace, fp32_ops: bool, what: str):
    """ct.convert with the export's target and precision (states come from the program's mutated buffers)."""
    if args.precision == "fp32":
        precision = ct.precision.FLOAT32
    else:
        precision = ct.transform.FP16ComputePrecision(op_selector=keep_fp32 if fp32_ops else lambda op: True)
    try:
        with quiet_converter():
            return ct.convert(program, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=getattr(ct.target, args.target), compute_precision=precision,
                              compute_units=getattr(ct.ComputeUnit, args.compute_units.upper()), skip_model_load=True)
    except Exception as e:  # noqa: BLE001 (one line for the user; the cause stays chained for debugging)
        raise UserError(f"coremltools {ct.__version__} cannot convert the {what}: {first_line(e)}") from e


def save_llm_function(ct, program, inputs: list, args: argparse.Namespace, path: Path) -> Path:
    """One LLM function (`path.stem`: prefill or decode, output `logits`) converted and saved as its own package;
    the exporters merge the functions into one multifunction package afterwards."""
    mlmodel = convert(ct, program, inputs, [ct.TensorType(name="logits", dtype=np_float(args))], args, fp32_ops=True,
                      what=f"LLM {path.stem} function")
    with quiet_converter():
        mlmodel.save(str(path))
    return path


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def np_float(args: argparse.Namespace):
    return np.float16 if args.precision == "fp16" else np.float32


# ----- packages ---------------------------------------------------------------------------------------------


def describe(spec, description: str, metadata: dict) -> None:
    """Key facts in a package spec's metadata (Xcode shows them; user-defined values are strings)."""
    spec.description.metadata.author = GENERATOR
    spec.description.metadata.shortDescription = description
    spec.description.metadata.versionString = GENERATOR.split()[-1]
    for key, value in string_metadata(metadata).items():
        spec.description.metadata.userDefined[key] = value


def string_metadata(metadata: dict) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in metadata.items()}


def save_package(mlmodel, path: Path, description: str, metadata: dict) -> None:
    mlmodel.author, mlmodel.short_description = GENERATOR, description
    mlmodel.version = GENERATOR.split()[-1]
    mlmodel.user_defined_metadata.update(string_metadata(metadata))
    with quiet_converter():
        mlmodel.save(str(path))
    publish_package(path)


def publish_package(path: Path) -> None:
    """coremltools writes private (0600 / 0700) files; an export is an ordinary readable directory."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def package_entry(out: Path, path: Path) -> dict:
    """Manifest artifact of an .mlpackage (a directory): tree digest, total size, and each function's I/O."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    functions = {f.name: function_io(f) for f in desc.functions} if len(desc.functions) else {"main": function_io(desc)}
    entry = {"path": path.name, "sha256": sha256_tree(path), "size": tree_size(path), "format": "mlpackage",
             "sha256_of": "directory tree (runtime.manifest.sha256_tree)", "functions": functions}
    if list(functions) == ["main"]:
        entry.update(inputs=functions["main"]["inputs"], outputs=functions["main"]["outputs"])
    else:
        entry["default_function"] = desc.defaultFunctionName
    return entry


def function_io(desc) -> dict:
    """Inputs, outputs and states of one function, as manifest tensors."""
    from coremltools.proto import FeatureTypes_pb2  # noqa: PLC0415

    names = {v: k.lower() for k, v in FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.items()}
    dtypes = {"float16": "float16", "float32": "float32", "int32": "int32", "double": "float64"}

    def tensor(feature, array) -> dict:
        return {"name": feature.name, "shape": [int(d) for d in array.shape],
                "dtype": dtypes.get(names[array.dataType], names[array.dataType])}

    return {"inputs": [tensor(f, f.type.multiArrayType) for f in desc.input],
            "outputs": [tensor(f, f.type.multiArrayType) for f in desc.output],
            "states": [tensor(f, f.type.stateType.arrayType) for f in desc.state]}


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
