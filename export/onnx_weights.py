"""Where `export.onnx` gets its weights: one part of the model at a time (vision, audio, LLM, embedding table).

    weights = open_weights(ckpt, args, dtype, audio_level)
    with weights.part(VISION):
        ...  # trace and measure the vision graph
    table = weights.embedding_table()

- `StreamedWeights` (`--quant int4-rtn` or `none` on a checkpoint): the model starts without weights
  (minicpm.lazy_model); each part is read from the checkpoint when its graph is exported and dropped after it.
  A quantised Linear is quantised alone, straight from its stored weight, into its MatMulNBits tensors: neither a
  float32 copy of the model nor the unpacked codes of every layer is ever held, so the peak is about one part
  plus its onnxruntime session. The codes are rtn_quantize's (same quant.codes arithmetic on the same float32
  values), so the artifacts are byte for byte those of a full load. `load_whole` reads the whole model the same
  way (quantised Linears installed one by one, no table) for exporters whose converter takes every graph at once
  (export.executorch_weights, export.coreai).
- `LoadedWeights` (AWQ, which calibrates on the whole float model, and quantised checkpoint directories): the
  whole float32 model with the records installed, as `export.quantization.quantized_model` returns it.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from export import matmul_nbits
from export.quantization import (
    AUDIO_PREFIX,
    LM_HEAD,
    Quantization,
    audio_records,
    check_request,
    llm_records,
    quantized_model,
)
from minicpm.checkpoint import TIED_HEAD, Checkpoint
from minicpm.lazy_model import LazyModel
from minicpm.split import token_embedding_table
from quant.config import QuantConfig
from quant.records import QuantRecord
from quant.search import quantize_weight

VISION = ("vpm.", "resampler.")
AUDIO = ("apm.", "audio_projection_layer.")
LLM = ("llm.",)
EMBEDDING = "llm.model.embed_tokens.weight"  # the host's table (token_embedding.bin), never in a graph
HEAD_ROWS = 4096  # table rows converted at a time (int8 head codes are per row: blocks give the same record)


def open_weights(ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype,
                 audio_level: int) -> StreamedWeights | LoadedWeights:
    """Streamed when nothing needs the whole model (RTN or no quantisation of a checkpoint), else loaded.
    MatMulNBits run at `args.accuracy_level` in the LLM and at `audio_level` in the audio encoder."""
    directory = (ckpt.path / "quant_config.json").is_file()
    if directory or args.quant == "int4-awq":
        return LoadedWeights(ckpt, args, dtype, audio_level)
    return StreamedWeights(ckpt, args, dtype, audio_level)


class LoadedWeights:
    """The whole model, quantised by `quantized_model`, records installed as MatMulNBits; parts are no-ops."""

    def __init__(self, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype, audio_level: int):
        self.model, self.records, self.quant = quantized_model(
            ckpt, args.quant, args.group_size, args.symmetric or None, args.lm_head, args.samples, args.calib,
            quantize_audio=args.quantize_audio or None)
        self.model.to(dtype)
        matmul_nbits.install(self.model, llm_records(self.records), dtype, args.accuracy_level)
        matmul_nbits.install(self.model, audio_records(self.records), dtype, audio_level)

    @contextlib.contextmanager
    def part(self, prefixes: tuple[str, ...]) -> Iterator[None]:
        yield

    def embedding_table(self) -> torch.Tensor:
        return token_embedding_table(self.model)


class StreamedWeights:
    """The model part by part from the checkpoint; its int4 / int8 Linears quantised as each part is read.

    `records` maps the name of every Linear written as MatMulNBits to None: the exporters only need the names
    (initializer names, the manifest); the codes live in the installed modules while their part does."""

    def __init__(self, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype, audio_level: int):
        method = args.quant or "none"
        check_request(ckpt, method, args.quantize_audio, args.group_size, args.calib)
        self.dtype, self.levels = dtype, (args.accuracy_level, audio_level)
        self.lazy = LazyModel.open(ckpt.path)
        self.model = self.lazy.model.to(dtype)  # meta parameters only change dtype; buffers convert as after a load
        self.config = QuantConfig(group_size=args.group_size or 128, symmetric=bool(args.symmetric),
                                  lm_head=args.lm_head or "keep", quantize_audio=bool(args.quantize_audio))
        self.kinds = _plan(self.model, self.config, method, args.lm_head == "int8")  # name -> "int4" / "int8"
        self.records = dict.fromkeys(self.kinds)
        self.quant = _summary(self.model, self.config, method, self.kinds)

    @contextlib.contextmanager
    def part(self, prefixes: tuple[str, ...],
             install: Callable[[str, QuantRecord], None] | None = None) -> Iterator[None]:
        """Read the parameters under `prefixes` (but the embedding table), quantising the planned Linears and
        installing each (`install(name, record)`, which replaces its Linear; default: as MatMulNBits);
        everything goes back to the meta device when the block ends."""
        planned = {n: kind for n, kind in self.kinds.items() if n.startswith(prefixes)}
        self.lazy.materialize(prefixes, skip={EMBEDDING, *(f"{n}.weight" for n in planned)})
        linears = {n: self.model.get_submodule(n) for n in planned}  # put back on release
        start = time.perf_counter()
        for name, kind in planned.items():
            record = self.quantize(name, kind)
            record.check(name)
            if install is None:
                level = self.levels[name.startswith(AUDIO_PREFIX)]
                matmul_nbits.replace(self.model, name, record, self.dtype, level)
            else:
                install(name, record)
        self.quant.seconds += time.perf_counter() - start
        try:
            yield
        finally:
            for name, linear in linears.items():
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, linear)
            self.lazy.release(prefixes)

    def load_whole(self, install: Callable[[str, QuantRecord], None]) -> None:
        """The whole model at once, for exporters whose converter takes every graph of a program together
        (ExecuTorch, Core AI): every parameter read (in the model's dtype) but the planned Linears' weights, each
        quantised alone and handed to `install(name, record)`, which replaces its Linear, so no float copy of a
        quantised weight is ever held; and but the embedding table (the host's token_embedding.bin, see
        `embedding_table`), unless a float head tied to it needs it."""
        skip = {f"{n}.weight" for n in self.kinds} | ({TIED_HEAD} if self.tied_float_head else {EMBEDDING})
        self.lazy.materialize(("",), skip=skip)
        if self.tied_float_head:  # one tensor for the table and the head, as load_model ties them
            self.model.llm.lm_head.weight = self.model.llm.model.embed_tokens.weight
        start = time.perf_counter()
        for name, kind in self.kinds.items():
            record = self.quantize(name, kind)
            record.check(name)
            install(name, record)
        self.quant.seconds += time.perf_counter() - start

    @property
    def tied_float_head(self) -> bool:
        """The head is the embedding table itself (tied and left float)."""
        return self.model.config.llm.tie_word_embeddings and LM_HEAD not in self.kinds

    def quantize(self, name: str, kind: str) -> QuantRecord:
        """rtn_quantize's int4 record / int8_head's record of the Linear `name`, from its stored weight."""
        if kind == "int4":
            codes, scales, zeros = quantize_weight(self.lazy.read(f"{name}.weight"), self.config)
            return QuantRecord(codes, scales, zeros, self.config.group_size, self.config.bits, self.config.symmetric)
        stored = self.lazy.stored(f"{name}.weight")
        # each block's float32 temporaries freed before the next
        blocks = [QuantRecord.int8_rows(rows) for rows in stored.split(HEAD_ROWS)]
        return QuantRecord(*(torch.cat([getattr(b, f) for b in blocks]) for f in ("codes", "scales", "zeros")),
                           group_size=stored.shape[1], bits=8, symmetric=True)

    def embedding_table(self) -> torch.Tensor:
        """The token embedding table with the values of the loaded model's (float32, cast to the export's dtype).
        For float32 that is the stored table itself (bf16 / fp16 to float32 is exact; the writer converts it block
        by block), so no float32 copy of it is made."""
        if self.tied_float_head and self.model.llm.model.embed_tokens.weight.device.type != "meta":
            return self.model.llm.model.embed_tokens.weight.detach()  # load_whole read it for the head
        stored = self.lazy.stored(EMBEDDING)
        if self.dtype == torch.float32:
            return stored
        return torch.cat([rows.float().to(self.dtype) for rows in stored.split(HEAD_ROWS)])


def _plan(model, config: QuantConfig, method: str, int8_head: bool) -> dict[str, str]:
    """The Linears written as MatMulNBits: rtn_quantize's plan (made on the meta model), and the int8 head."""
    from quant.layout import make_plan  # noqa: PLC0415

    kinds = {}
    if method == "int4-rtn":
        plan = make_plan(model, config)
        kinds = {n: "int4" for n in plan.int4 if n.startswith((*LLM, AUDIO_PREFIX))}  # as written_records
        kinds.update({n: "int8" for n in plan.int8 if n == LM_HEAD})
    if int8_head:
        kinds[LM_HEAD] = "int8"
    return kinds


def _summary(model, config: QuantConfig, method: str, kinds: dict[str, str]) -> Quantization:
    """The Quantization entry `quantized_model` reports for the same request."""
    int4 = [n for n, kind in kinds.items() if kind == "int4"]
    info = Quantization(method=method, source="this export" if method != "none" else "none",
                        int4_layers=len(int4), int8_layers=len(kinds) - len(int4),
                        audio_layers=sum(n.startswith(AUDIO_PREFIX) for n in int4), has_audio=hasattr(model, "apm"),
                        lm_head="int8" if LM_HEAD in kinds else "keep")
    if int4:
        info.group_size, info.symmetric = config.group_size, config.symmetric
    return info


def memory_note() -> str:
    """This process's resident memory now and at its peak, for progress bars."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    try:
        now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30
    except OSError:  # no /proc (macOS): the peak alone
        return f"RSS peak {peak:.1f} GiB"
    return f"RSS {now:.1f} GiB, peak {peak:.1f} GiB"


class MemoryStatus:
    """A progress bar's postfix: what is being done and the memory, refreshed every few seconds while a phase
    runs (a full-size graph takes minutes)."""

    def __init__(self, bar, seconds: float = 5.0):
        self.bar, self.what, self.stopped = bar, "", threading.Event()
        self.thread = threading.Thread(target=self._refresh, args=(seconds,), daemon=True)
        self.thread.start()

    def __call__(self, what: str) -> None:
        self.what = what
        self.bar.set_postfix_str(f"{what} | {memory_note()}")

    def _refresh(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            if self.what:
                self(self.what)

    def __enter__(self) -> MemoryStatus:
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
