"""Core AI plumbing for `export.coreai`: torch.export -> `.aimodel` (coreai-torch), running an asset through the
in-package runtime (`coreai.runtime`, CPU on Linux), and reading an asset's int4 constants back.

    program = export_program(module, example)                  # torch.export + coreai-torch decompositions
    path = save_asset({"prefill": ep1, "decode": ep2}, out / "llm.aimodel", input_names, ["logits"], states)
    with AssetRunner(path) as run: out = run("decode", inputs, state)   # sync facade over the async runtime
    weights = quantized_constants(path)                          # (codes, scales, zeros) of every int4/int8 op
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minicpm.errors import UserError
from runtime.backends.call_shapes import native_stderr_silenced

INT_INPUTS = (np.int64, np.int32)  # the runtime takes int32 where the torch graph has int64 inputs


def import_coreai():
    """coreai-torch and the coreai runtime, imported quietly (coreai-torch warns about its validated torch range)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coreai.runtime  # noqa: F401, PLC0415
            import coreai_torch  # noqa: PLC0415
            import coreai_torch._compression.custom_layers  # noqa: F401, PLC0415 (registers torch.ops.coreai.*)
    except ImportError:
        raise UserError("Core AI export needs coreai-torch and coreai-core: pip install coreai-torch==0.4.3 "
                        "coreai-core==1.0.0b3") from None
    return coreai_torch


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.export's and the converter's chatter (its rich progress line goes to stdout)."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._dynamo", "torch.fx", "coreai", "coreai_torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def export_program(module: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """torch.export (non-strict, static shapes) decomposed with coreai-torch's table."""
    coreai_torch = import_coreai()
    try:
        with torch.no_grad(), quiet():
            program = torch.export.export(module, args, strict=False)
            return program.run_decompositions(coreai_torch._decomp.get_decomp_table())
    except Exception as e:  # noqa: BLE001 (one line for the user; the cause stays chained)
        raise UserError(f"torch.export cannot trace {type(module).__name__}: {_first_line(e)}") from e


def save_asset(programs: dict[str, torch.export.ExportedProgram], path: Path, input_names: list[str],
               output_names: list[str], state_names: list[str] | None = None) -> Path:
    """One `.aimodel` holding every program as a function (entrypoint) of one module. Constants are MLIR
    attributes uniqued by content, so weights shared by the functions are stored once."""
    coreai_torch = import_coreai()
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    try:
        with quiet():
            for name, program in programs.items():
                converter.add_exported_program(program, input_names=input_names, output_names=output_names,
                                               state_names=state_names or [], entrypoint_name=name)
            converter.to_coreai().save_asset(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"coreai-torch cannot convert {path.name}: {_first_line(e)}") from e
    return path


class AssetRunner:
    """A loaded `.aimodel` behind a synchronous call: `runner(function, inputs, state) -> outputs` (numpy).

    The runtime is async; the runner owns an event loop and keeps `AIModelAsset.executable()` open (it lowers
    the asset to a temporary executable directory) until `close()`. `state` maps state names to
    `coreai.runtime.NDArray`s the function updates in place (see `new_state`).
    """

    def __init__(self, path: Path, functions: list[str] | None = None):
        import_coreai()
        from coreai.authoring import AIModelAsset  # noqa: PLC0415

        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        try:
            with quiet(), native_stderr_silenced():  # the runtime logs every function load on fd 2
                asset = AIModelAsset.load(Path(path))
                self.model = self.loop.run_until_complete(self.stack.enter_async_context(asset.executable()))
                names = functions or list(self.model.function_names)
                self.functions = {n: self.model.load_function(n) for n in names}
        except Exception as e:  # noqa: BLE001 (an unloadable asset is named, not dumped)
            self.close()
            raise UserError(f"the Core AI runtime cannot load {Path(path).name}: {_first_line(e)}") from None

    def __enter__(self) -> AssetRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.loop.is_closed():
            with native_stderr_silenced():
                self.loop.run_until_complete(self.stack.aclose())
            self.loop.close()

    def describe(self, name: str) -> dict:
        """Inputs, outputs and states of one function as manifest tensors."""
        desc = self.functions[name].desc

        def tensor(n: str, d) -> dict:
            return {"name": n, "shape": [s if s is not None else "?" for s in d.shape], "dtype": str(d.dtype)}

        out = {"inputs": [tensor(n, desc.input_descriptor(n)) for n in desc.input_names],
               "outputs": [tensor(n, desc.output_descriptor(n)) for n in desc.output_names]}
        out["states"] = [tensor(n, desc.state_descriptor(n)) for n in desc.state_names] \
            if hasattr(desc, "state_descriptor") else [{"name": n} for n in desc.state_names]
        return out

    def new_state(self, name: str, shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> dict:
        """Zeroed state arrays (a fresh conversation) for function `name`'s states."""
        from coreai.runtime import NDArray  # noqa: PLC0415

        return {n: NDArray(np.zeros(shapes[n], dtype=dtype)) for n in self.functions[name].desc.state_names}

    def __call__(self, name: str, inputs: dict[str, np.ndarray], state: dict | None = None) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray  # noqa: PLC0415

        feed = {k: NDArray(np.ascontiguousarray(v.astype(np.int32) if v.dtype in INT_INPUTS else v))
                for k, v in inputs.items()}
        out = self.loop.run_until_complete(self.functions[name](feed, state=state or {}))
        return {k: v.numpy() for k, v in out.items()}


# ----- reading the quantised weights back from an asset ------------------------------------------------------

_BLOCKWISE = re.compile(r"coreai\.blockwise_shift_scale (%\d+), (%\d+), (%\d+)(?:, (%\d+))? : \(([^)]*)\)")
_CONSTANT = re.compile(r"(%\d+) = coreai\.constant (?:dense_resource<(resource_\d+)>|dense<\"0x([0-9A-Fa-f]*)\">|"
                       r"dense<([-+.\deE]+)>|dense<(\[[-+.\deE\[\], ]*\])>) "
                       r": tensor<([0-9x]+)x(ui4|ui8|si4|si8|f16|f32)>")
_NUMBER = re.compile(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?")
_BLOB = re.compile(r"(resource_\d+): \"0x([0-9A-Fa-f]*)\"")
_DTYPES = {"ui4": np.uint8, "ui8": np.uint8, "si4": np.int8, "si8": np.int8, "f16": np.float16, "f32": np.float32}


def quantized_constants(path: Path, function: str | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(codes, scales, zeros) of every `blockwise_shift_scale` of one function (default: the last) of an asset,
    read from its stored program: codes/zeros as uint8 (4-bit values unpacked, low nibble first), scales as
    stored. An independent check that the asset holds exactly the records' codes (text IR: small models only)."""
    import_coreai()
    from coreai.authoring import AIModelAsset  # noqa: PLC0415

    text = str(AIModelAsset.load(Path(path)).program)
    blobs = {name: bytes.fromhex(data)[4:] for name, data in _BLOB.findall(text)}  # 4-byte alignment header
    graphs = re.split(r"coreai\.graph @", text.split("dialect_resources")[0])[1:]
    graph = next((g for g in graphs if g.startswith(f"{function}(")), None) if function else graphs[-1]
    if graph is None:
        raise UserError(f"{Path(path).name} has no function {function!r}")
    constants = {}
    for value, resource, inline, splat, literal, shape, dtype in _CONSTANT.findall(graph):
        dims = [int(d) for d in shape.split("x")]
        if splat:  # one value for the whole tensor (e.g. every int8 zero point is 128)
            constants[value] = np.full(dims, float(splat)).astype(_DTYPES[dtype])
            continue
        if literal:  # small tensors are printed as nested lists of decimal values
            numbers = [float(x) for x in _NUMBER.findall(literal)]
            constants[value] = np.array(numbers).astype(_DTYPES[dtype]).reshape(dims)
            continue
        array = np.frombuffer(blobs[resource] if resource else bytes.fromhex(inline), dtype=_DTYPES[dtype])
        if dtype in ("ui4", "si4"):
            array = np.stack([array & 15, array >> 4], axis=-1).reshape(-1)[: int(np.prod(dims))]
        constants[value] = array.reshape(dims)
    out = []
    for codes, scales, zeros, _offset, _types in _BLOCKWISE.findall(graph):
        out.append((constants[codes], constants[scales], constants[zeros]))
    return out
