"""The machine side of `runtime.bench`: DRAM read bandwidth, a child's peak RSS, the bytes of weights one decode
step reads (one function per export format) and the device estimate built from them.

Decode is memory-bound: every step reads all the LLM weights once, so tok/s <= bandwidth / bytes per token (the
roofline). `bytes_per_token` counts, in the artifact the decode step runs, every weight tensor except lookup
tables (tensors only gathered from: the token-embedding table when a graph holds it, RoPE cos/sin tables), of
which one row per token is read. The KV cache is state, not weights, and is not counted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

# REFERENCE section 9: device DRAM bandwidths (GB/s) and this project's anchor on its 2-vCPU machines.
DEVICES = {"A17 Pro": 51.0, "A18 Pro": 60.0, "M1": 68.25, "M4": 120.0}
REFERENCE_BANDWIDTH_GBS = 23.4  # torch.sum, 2 threads
# ONNX (domain, op) -> the inputs through which it reads a table one row per position (lookup tables)
ONNX_LOOKUPS = {("", "Gather"): {0}, ("", "GatherND"): {0}, ("", "GatherElements"): {0},
                ("", "RotaryEmbedding"): {1, 2}, ("com.microsoft", "RotaryEmbedding"): {2, 3},
                ("com.microsoft", "GroupQueryAttention"): {7, 8}}


# ---------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------


def backend_threads() -> int:
    """The intra-op thread count the backends use (runtime.backends: min(cores, 8))."""
    return min(os.cpu_count() or 1, 8)


def dram_read_bandwidth(gib: float = 1.0, repeats: int = 10, threads: int | None = None) -> float:
    """DRAM read bandwidth in GB/s: torch.sum over a float32 buffer far larger than the caches, best of
    `repeats`, on the backends' thread count (REFERENCE's anchor is measured the same way)."""
    import torch  # noqa: PLC0415

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or backend_threads())
    try:
        buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        buf.sum()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
        return round(buf.numel() * 4 / best / 1e9, 2)
    finally:
        torch.set_num_threads(previous)


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where there is none, e.g. macOS)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == field), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    return set(cpuinfo("flags").split())


def machine_facts() -> dict:
    cpu = cpuinfo("model name") or "unknown"
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                       "amx_int8") if f in flags]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"cpu_model": cpu, "cores": os.cpu_count(), "threads_used": backend_threads(), "isa": isa,
            "memory_gb": round(mem_gb, 1)}


def run_measured(cmd: list[str]) -> tuple[int, str, str, float, float]:
    """Run `cmd`; return (exit code, stdout, stderr, seconds, peak RSS in MB of it and its descendants), the
    peak from the child's own rusage (wait4), not the whole run's RUSAGE_CHILDREN maximum.

    The child is forked, not vforked (a `preexec_fn` makes subprocess fork): exec keeps the larger of the
    replaced address space's high-water mark and the new one, and a vforked child's replaced address space
    is this process's, so its peak (the bandwidth buffer) would show up as the child's."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=_forked)  # noqa: PLW1509 (no-op hook)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), seconds,
                usage.ru_maxrss / 1024)


def _forked() -> None:
    """The preexec_fn that makes subprocess fork instead of vfork (see run_measured)."""


# ---------------------------------------------------------------------------------------------------------
# Bytes of weights read per decode token, per format
# ---------------------------------------------------------------------------------------------------------


def bytes_per_token(export_dir: str | os.PathLike) -> int | None:
    """Weight bytes one decode step reads, from the export's artifact of the schedule's decode step
    (None for a format without a reader here)."""
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    step = manifest["schedule"]["steps"]["decode"]
    artifact = manifest["artifacts"][step["artifact"]]
    path = export_dir / artifact["path"]
    reader = {"onnx": onnx_decode_bytes, "executorch": executorch_decode_bytes,
              "coreai": coreai_decode_bytes, "coreml": coreml_decode_bytes}.get(manifest["format"])
    if reader is None:
        return None
    return reader(path, step.get("function"))


def coreml_decode_bytes(path: Path, function: str | None = None) -> int:
    """Core ML: the LLM package's weight file (prefill and decode share it; the token table is the host's)."""
    return sum(f.stat().st_size for f in path.glob("Data/com.apple.CoreML/weights/*.bin"))


def onnx_decode_bytes(path: Path, function: str | None = None) -> int:
    """ONNX: the decode graph's initializers (and Constant nodes) at their stored size: MatMulNBits codes,
    scales and zero points, float or int8 head, norm weights; minus tensors every consumer of which reads them
    as a lookup table (a Gather's data, the cos/sin caches of RotaryEmbedding / GroupQueryAttention), and
    scalars and int32/int64 shape constants. The graph holds the LLM only: vision and audio are other files, and
    the token-embedding table is the host's `token_embedding.bin`."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    graph = onnx.load(str(path), load_external_data=False).graph
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append(((node.domain.replace("ai.onnx", ""), node.op_type), i))

    def nbytes(t) -> int:
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return (int(np.prod(t.dims)) + 1) // 2
        return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value"]
    total = 0
    for name, t in tensors:
        if not t.dims or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue  # scalars and shape / axis / index constants, not weights
        consumers = uses.get(name, [])
        if consumers and all(i in ONNX_LOOKUPS.get(op, ()) for op, i in consumers):
            continue  # a lookup table: one row per token
        total += nbytes(t)
    return total


def executorch_decode_bytes(path: Path, function: str | None = None) -> int:
    """ExecuTorch: in the .pte method the decode step calls (text_decoder), the weights its XNNPACK delegates
    reference (named data, found by key in each delegate blob, each counted once per method; packed int4 codes
    and their scales), plus the delegate blobs themselves (inline constants) and the constants its portable
    kernels read (norm weights, ...), minus constants only read by index / embedding / gather kernels."""
    from executorch.exir._serialize._program import deserialize_pte_binary  # noqa: PLC0415

    pte = deserialize_pte_binary(path.read_bytes())
    program = pte.program
    plan = next(p for p in program.execution_plan if p.name == (function or "text_decoder"))
    store = pte.named_data
    named = {key: len(store.buffers[entry.buffer_index]) for key, entry in (store.pte_data or {}).items()}
    total, seen = 0, set()
    for delegate in plan.delegates:
        blob = program.backend_delegate_data[delegate.processed.index].data
        total += len(blob)
        text = bytes(blob).decode("latin1")
        for key in named.keys() - seen:
            if key in text:
                seen.add(key)
                total += named[key]
    lookups = ("aten::index", "aten::index_select", "aten::embedding", "aten::gather")
    users: dict[int, list[str]] = {}
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if not hasattr(call, "args"):
                continue
            op_index = getattr(call, "op_index", None)
            name = plan.operators[op_index].name if op_index is not None else type(call).__name__
            for arg in call.args:
                users.setdefault(arg, []).append(name)
    for i, value in enumerate(plan.values):
        buffer = getattr(value.val, "data_buffer_idx", 0)
        if not buffer or i not in users or all(op in lookups for op in users[i]):
            continue
        total += len(program.constant_buffer[buffer].storage)
    return total


_AICODE_TYPE = re.compile(r"tensor_v1<\[([\d, ]*)\] : !aicode\.(u?int|float|bfloat)(\d+)_v1>")


def coreai_decode_bytes(path: Path, function: str | None = None) -> int:
    """Core AI: the constants of the asset's decode function (`main.mlirb`, parsed with coreai's MLIR bindings)
    at their stored width (ui4 codes, scales, zero points, ui8 head, norms), minus constants only read as a
    gather's data (lookup tables). Constants are uniqued by content, so a weight shared with prefill counts once."""
    from coreai._compiler import ir  # noqa: PLC0415
    from coreai._compiler.context import Context  # noqa: PLC0415

    with Context():
        module = ir.Module.parse((path / "main.mlirb").read_bytes())
        want = function or "decode"
        graph = None
        for op in module.body.operations:
            for inner in _walk(op.operation, depth=1):
                if "name" in inner.attributes and f'"{want}"' in str(inner.attributes["name"]):
                    graph = inner
                    break
        if graph is None:
            raise ValueError(f"{path}: no function {want!r}")
        total, seen = 0, set()
        for op in _walk(graph):
            if op.name != "aicode.primitive.constant_v1":
                continue
            result = op.results[0]
            uses = [(u.owner.name, u.operand_number) for u in result.uses]
            if uses and all("gather" in name and i == 0 for name, i in uses):
                continue
            key = hash(op.attributes["value"])
            match = _AICODE_TYPE.search(str(result.type))
            if key in seen or match is None:
                continue
            seen.add(key)
            numel = 1
            for d in filter(None, (s.strip() for s in match.group(1).split(","))):
                numel *= int(d)
            total += (numel * int(match.group(3)) + 7) // 8
        return total


def _walk(op, depth: int | None = None):
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                yield inner.operation
                if depth is None:
                    yield from _walk(inner.operation)
                elif depth > 1:
                    yield from _walk(inner.operation, depth - 1)


# ---------------------------------------------------------------------------------------------------------
# Roofline and device estimate
# ---------------------------------------------------------------------------------------------------------


def roofline(row: dict, bandwidth_gbs: float) -> dict:
    """Roofline tok/s (bandwidth / bytes per token) and the % of it the measured decode reached."""
    nbytes = row.get("bytes_per_token")
    if not nbytes or not row.get("decode_tok_s"):  # an export this machine cannot run (Core ML on Linux)
        return {}
    limit = bandwidth_gbs * 1e9 / nbytes
    return {"roofline_tok_s": round(limit, 2), "roofline_pct": round(100 * row["decode_tok_s"] / limit, 2)}


def device_estimates(rows: list[dict], bandwidth_gbs: float, devices: dict[str, float] = DEVICES) -> list[dict]:
    """Predicted decode tok/s per device: device bandwidth / bytes per token x the efficiency measured here
    (decode tok/s over this machine's roofline, `bandwidth_gbs` / bytes per token)."""
    out = []
    for r in rows:
        if not r.get("bytes_per_token") or not r.get("decode_tok_s"):
            continue
        efficiency = r["decode_tok_s"] * r["bytes_per_token"] / (bandwidth_gbs * 1e9)
        out.append({"model": r["model"], "export": r["export"], "backend": r["backend"],
                    "bytes_per_token": r["bytes_per_token"], "efficiency": round(efficiency, 6),
                    "predicted_tok_s": {d: round(bw * 1e9 / r["bytes_per_token"] * efficiency, 2)
                                        for d, bw in devices.items()}})
    return out
