"""Which quantised weights an exporter writes: a quantised checkpoint's own records, or records computed now.

    model, records, info = quantized_model(ckpt, "int4-awq", group_size=128)

`model` is the float32 model with every record's dequantised weight installed (explicit AWQ input scales as
`InputScaledLinear`), i.e. `QuantResult.model`: the PyTorch reference of the exported graphs. `records` holds
what the exporters write as int4 / int8 weights (`written_records`): the LLM's Linears always, and MiniCPM-o's
Whisper encoder Linears (`apm.layers.*`) with `quantize_audio` (opt-in: `--quantize-audio` on the exporters and on
`python -m quant.awq`). Everything else stays float: vision (a vision record from `--quantize-vision` is kept as its
dequantised float weight) and the audio projection into the LLM. `info` is the manifest entry and summary.

An exporter writes `llm_records(records)` in its LLM graph and `audio_records(records)` in its audio graph.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from torch import nn

from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from quant.layout import is_hybrid

QUANT_METHODS = ("int4-awq", "int4-rtn", "none")
LM_HEAD = "llm.lm_head"
HYBRID_LLM = ("model.language_model.", "lm_head")  # MiniCPM-V 4.6 / 4.7 (transformers' names): the LLM's Linears
AUDIO_PREFIX = "apm."  # MiniCPM-o's Whisper encoder; its records are written with quantize_audio


def add_quantize_audio_argument(parser) -> None:
    """`--quantize-audio`, next to each exporter's --quant."""
    parser.add_argument("--quantize-audio", action="store_true",
                        help="MiniCPM-o: int4 weights in the Whisper audio encoder's blocks too (opt-in; the audio "
                             "projection stays float). A quantised checkpoint directory made with python -m quant.awq "
                             "--quantize-audio brings its audio records without it")


@dataclass
class Quantization:
    """What was quantised: the manifest's `quantization` entry and numbers for the summary."""

    method: str = "none"  # int4-awq, int4-rtn or none
    group_size: int | None = None
    symmetric: bool | None = None
    int4_layers: int = 0  # every int4 Linear written, the audio encoder's included
    audio_layers: int = 0  # of which in the Whisper audio encoder (quantize_audio)
    has_audio: bool = False  # the model has an audio encoder (MiniCPM-o)
    int8_layers: int = 0  # per-row int8 Linears (lm_head with --lm-head int8)
    lm_head: str = "keep"  # keep (float) or int8
    source: str = "none"  # "this export", or the quantised checkpoint directory the records came from
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def manifest(self, **extra) -> dict:
        """The manifest entry; `extra` adds format-specific facts (e.g. how the records were written)."""
        if self.method == "none":
            entry = {"method": "none", "bits": None, "group_size": None, "symmetric": None}
        else:
            entry = {"method": self.method, "bits": 4, "group_size": self.group_size, "symmetric": self.symmetric,
                     "layers": self.int4_layers}
        return {**entry, "audio_layers": self.audio_layers, "int8_layers": self.int8_layers, "lm_head": self.lm_head,
                "records_from": self.source, **extra}

    def describe(self) -> str:
        """One summary line."""
        if self.method == "none":
            return f"quantization: none, lm_head {self.lm_head}"
        text = f"quantization: {self.method} from {self.source}, {self.int4_layers} int4 layers"
        if self.has_audio:
            text += f" ({self.audio_layers} in the audio encoder)" if self.audio_layers else ", audio encoder float"
        if self.group_size:
            text += f" (group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'})"
        return text + f", lm_head {self.lm_head}, {self.seconds:.1f}s"


def check_request(ckpt: Checkpoint, method: str | None, quantize_audio: bool | None, group_size: int | None,
                  calib: str | None) -> None:
    """One-line refusals of a quantisation request (`method` None: a quantised directory's own records), shared by
    `quantized_model` and the streamed exporters."""
    if quantize_audio and getattr(ckpt.config, "audio", None) is None:
        variant = getattr(ckpt.config, "variant", None)  # the hybrid models' transformers configs have none
        name = variant.name if variant is not None else ckpt.path.name
        raise UserError(f"--quantize-audio: {name} has no audio encoder (MiniCPM-o only)")
    if method is None:
        return
    if quantize_audio and method == "none":
        raise UserError("--quantize-audio applies to int4 quantisation, not --quant none")
    if method == "none" and group_size is not None:
        raise UserError("--group-size applies to int4 quantisation, not --quant none")
    if calib is not None and method != "int4-awq":
        raise UserError(f"--calib is used by --quant int4-awq only, not {method}")


def quantized_model(ckpt: Checkpoint, quant: str | None = None, group_size: int | None = None,
                    symmetric: bool | None = None, lm_head: str | None = None, samples: int = 32,
                    calib: str | None = None, seq_len: int = 256, default: str = "none",
                    default_lm_head: str = "keep", quantize_audio: bool | None = False
                    ) -> tuple[MiniCPMV, dict, Quantization]:
    """The float32 model with its quantised weights installed, the records to write (`written_records`), and a
    summary.

    A quantised checkpoint directory (`python -m quant.awq`, it has quant_config.json) brings its own records,
    used as they are: `quant` None means its method, another method is refused, and so are a different
    `group_size` or `symmetric=True` over asymmetric records. Otherwise `quant` (None = `default`) says what to
    run now: AWQ on the built-in calibration set (or the JSONL `calib`), RTN, or nothing.
    symmetric: None = as the records are (asymmetric when quantising now); True = required for int4 (XNNPACK).
    lm_head: "keep" (float), "int8" (per-row int8 record) or None: as a quantised directory's records are, else
    `default_lm_head` when quantising (Core ML: int8) and keep with no quantisation.
    quantize_audio: True = int4 in the Whisper encoder's blocks too (quantised now, or required of a quantised
    directory's records); None = as a quantised directory's records are (no audio when quantising now); False =
    the audio encoder is written float (a directory's audio records stay as their dequantised float weights).
    """
    if quant is not None and quant not in QUANT_METHODS:
        raise UserError(f"quantisation must be one of {', '.join(QUANT_METHODS)}, got {quant!r}")
    if lm_head not in (None, "keep", "int8"):
        raise UserError(f"lm_head must be 'keep' or 'int8', got {lm_head!r}")
    directory = (ckpt.path / "quant_config.json").is_file()
    check_request(ckpt, None if directory else quant or default, quantize_audio, group_size, calib)
    info = Quantization()
    start = time.perf_counter()
    if directory:
        model, records, info.method = _from_directory(ckpt, quant, calib)
        info.source = str(ckpt.path)
        if quantize_audio and not any(n.startswith(AUDIO_PREFIX) for n in records):
            raise UserError(f"{ckpt.path} holds no audio encoder records: quantise it with python -m quant.awq "
                            "--quantize-audio, or drop --quantize-audio")
    else:
        method = quant or default
        model, records = _quantize_now(ckpt, method, group_size or 128, bool(symmetric), lm_head == "int8", samples,
                                       calib, seq_len, bool(quantize_audio))
        info.method, info.source = method, "this export" if method != "none" else "none"
    model.eval().requires_grad_(False)
    records = written_records(model, records, quantize_audio is not False, info.notes)
    head = head_name(model)
    if directory:
        _check_directory_records(ckpt, records, group_size, symmetric)
    if lm_head is None:
        lm_head = "int8" if head in records or (info.method != "none" and default_lm_head == "int8") else "keep"
    if lm_head == "int8" and head not in records:
        records[head] = int8_head(model)
    elif lm_head == "keep" and head in records:
        records.pop(head)  # the model keeps the int8 record's dequantised values as its float weight
        info.notes.append("lm_head stored as float (its int8 record's dequantised values, --lm-head keep)")
    int4 = [r for r in records.values() if r.bits == 4]
    info.int4_layers, info.int8_layers = len(int4), len(records) - len(int4)
    info.audio_layers, info.has_audio = len(audio_records(records)), hasattr(model, "apm")
    info.lm_head = "int8" if head in records else "keep"
    if int4:
        info.group_size = int4[0].group_size
        info.symmetric = all(r.symmetric for r in int4)
    info.seconds = time.perf_counter() - start
    return model, records, info


def _from_directory(ckpt: Checkpoint, quant: str | None, calib: str | None) -> tuple[MiniCPMV, dict, str]:
    from quant.checkpoint import CONFIG_FILE, load_quantized  # noqa: PLC0415

    meta = ckpt.path / CONFIG_FILE
    try:  # the method, read before the weights so that a conflict is refused at once
        method = f"int4-{json.loads(meta.read_text()).get('method') or 'awq'}"
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{meta}: not a readable quantisation config (see python -m quant.awq)") from None
    if quant not in (None, method):
        raise UserError(f"{ckpt.path} is already quantised ({method}); drop --quant or pass --quant {method}")
    if calib is not None:
        raise UserError(f"{ckpt.path} is already quantised ({method}): --calib has nothing to calibrate")
    result = load_quantized(ckpt.path, "float32")
    return result.model, dict(result.records), method


def _check_directory_records(ckpt: Checkpoint, records: dict, group_size: int | None, symmetric: bool | None) -> None:
    """A quantised directory's records to be written must have the requested group size and, for targets that
    need it, be symmetric."""
    int4 = [r for r in records.values() if r.bits == 4]
    sizes = {r.group_size for r in int4}
    if group_size is not None and sizes and sizes != {group_size}:
        raise UserError(f"{ckpt.path} holds group size {', '.join(map(str, sorted(sizes)))}, not --group-size "
                        f"{group_size}")
    if symmetric and not all(r.symmetric for r in int4):
        raise UserError(f"{ckpt.path} holds asymmetric records (zero points); this target needs symmetric ones: "
                        "python -m quant.awq --symmetric" + (" --quantize-audio" if audio_records(records) else ""))


def _quantize_now(ckpt: Checkpoint, method: str, group_size: int, symmetric: bool, int8_head_: bool, samples: int,
                  calib: str | None, seq_len: int, quantize_audio: bool = False) -> tuple[MiniCPMV, dict]:
    model, _ = ckpt.load_model("float32")
    if method == "none":
        return model, {}
    from quant import QuantConfig, awq_quantize, rtn_quantize  # noqa: PLC0415

    # a head tied to the embedding table gets its int8 record from `int8_head` instead (quantized_model): as its own
    # Parameter, so the table keeps its float weights (the quantisers would write the head's values into both)
    tied = _head_is_tied(model)
    config = QuantConfig(group_size=group_size, symmetric=symmetric,
                         lm_head="int8" if int8_head_ and not tied else "keep", quantize_audio=quantize_audio)
    if method == "int4-rtn":
        return model, rtn_quantize(model, config).records
    from quant.calibration import build_calibration  # noqa: PLC0415

    calibration = build_calibration(ckpt, model, calib, samples=samples, seq_len=seq_len, audio=quantize_audio)
    return model, awq_quantize(model, calibration, config).records


def written_records(model: MiniCPMV, records: dict, quantize_audio: bool, notes: list[str] | None = None) -> dict:
    """The records every exporter writes as int4 / int8 weights: Linears of the LLM, and, when `quantize_audio`,
    Linears of the Whisper audio encoder (`apm.`). The rest (vision with --quantize-vision, int8 embedding tables,
    audio records without quantize_audio) stay as their dequantised float weights, which the model already holds;
    `notes` gets one line saying so."""
    llm = HYBRID_LLM if is_hybrid(model) else ("llm.",)
    prefixes = (*llm, AUDIO_PREFIX) if quantize_audio else llm
    kept, out = [], {}
    for name, record in records.items():
        module = model.get_submodule(name) if name.startswith(prefixes) else None
        if isinstance(module, nn.Linear):
            out[name] = record
        else:
            kept.append(name)
    if kept and notes is not None:
        where = "the LLM's and the audio encoder's Linears" if quantize_audio else "the LLM's Linears"
        notes.append(f"{len(kept)} records outside {where} kept as float weights ({', '.join(kept[:3])}"
                     + (", ..." if len(kept) > 3 else "") + ")")
    return out


def audio_records(records: dict) -> dict:
    """The records of the Whisper audio encoder (written in the audio graph)."""
    return {n: r for n, r in records.items() if n.startswith(AUDIO_PREFIX)}


def llm_records(records: dict) -> dict:
    """The records of the LLM graph (everything but the audio encoder's)."""
    return {n: r for n, r in records.items() if not n.startswith(AUDIO_PREFIX)}


def head_name(model: nn.Module) -> str:
    """The output head's module name: `llm.lm_head`, or `lm_head` on MiniCPM-V 4.6 / 4.7."""
    return HYBRID_LLM[1] if is_hybrid(model) else LM_HEAD


def _head_is_tied(model: nn.Module) -> bool:
    """The output head's weight is an embedding table's (tie_word_embeddings)."""
    weight = model.get_submodule(head_name(model)).weight
    return any(m.weight is weight for m in model.modules() if isinstance(m, nn.Embedding))


def int8_head(model: MiniCPMV):
    """A per-row symmetric int8 record of lm_head (quant/'s int8 scheme), installed as the head's own Parameter
    so a tied embedding table keeps its float weights."""
    from quant import QuantRecord  # noqa: PLC0415

    head = model.get_submodule(head_name(model))
    record = QuantRecord.int8_rows(head.weight.detach())
    head.weight = nn.Parameter(record.dequantize(head.weight.dtype), requires_grad=False)
    return record
