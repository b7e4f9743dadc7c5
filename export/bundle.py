"""What every exporter shares: arguments, the staged output directory, model-side files, the token
embedding table, the manifest and the final summary table. Format-specific code stays in its exporter."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from export.prompt_pieces import prompt_pieces
from minicpm.checkpoint import Checkpoint
from minicpm.modeling import MiniCPMV
from minicpm.prompt import SpecialTokens
from minicpm.split import token_embedding_table
from runtime.manifest import SCHEMA_VERSION, sha256_file

# Covers every slice and source image for aspect ratios up to 1:20 (measured over 16..4000 px sizes);
# 1024 would not: a 640x480 photo's source image is 37 x 28 = 1036 patches.
DEFAULT_MAX_PATCHES = 1088
MODEL_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "tokenizer.model"]
TOKENIZER_FILES = MODEL_FILES[3:]


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, short name or tiny model")
    parser.add_argument("--out", required=True, help="output directory (replaced when the export succeeds)")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="tokens per prefill call (default 128)")
    parser.add_argument("--max-context", type=int, default=4096, help="KV cache length (default 4096)")
    parser.add_argument("--max-slice-nums", type=int, help="slices per image (default: the checkpoint's)")
    parser.add_argument("--max-patches", type=int,
                        help=f"patch row length of the vision graph (default {DEFAULT_MAX_PATCHES}; MiniCPM-V 4.6 / "
                             "4.7: the largest slice their image processor makes, 1200 at its 448 px setting)")


def check_export_arguments(args: argparse.Namespace) -> None:
    """One-line refusals of impossible arguments; an unset --max-patches becomes DEFAULT_MAX_PATCHES (the hybrid
    exporters choose theirs before calling this)."""
    from minicpm.errors import UserError  # noqa: PLC0415

    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_context < args.prefill_chunk + 1:
        raise UserError(f"--max-context ({args.max_context}) must exceed --prefill-chunk ({args.prefill_chunk})")
    if args.max_patches is None:
        args.max_patches = DEFAULT_MAX_PATCHES
    if args.max_patches < 1:
        raise UserError(f"--max-patches must be >= 1, got {args.max_patches}")
    if args.max_slice_nums is not None and args.max_slice_nums < 1:
        raise UserError(f"--max-slice-nums must be >= 1, got {args.max_slice_nums}")


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Write into a temporary sibling of `out`; it replaces `out` only when the block completes.

    Killed at any point, `out` is the previous complete export or absent, never a mixture. Siblings left by
    killed runs (`.NAME.tmp-PID-*`, `.NAME.old-PID`) are removed by the next run once PID is dead. Concurrent
    exports to one `out` swap in under an exclusive lock on its parent directory, so the last to finish wins, whole.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary directory
    previous = _stop_on_interrupt(tmp)
    try:
        yield tmp
        # Lock the parent directory itself (no lock file left beside `out`); released on close or death.
        parent = os.open(out.parent, os.O_RDONLY)
        try:
            fcntl.flock(parent, fcntl.LOCK_EX)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            os.close(parent)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_on_interrupt(tmp: Path):
    """Ctrl-C while staging: remove the staged directory and exit 130 at once. A KeyboardInterrupt is not enough:
    converters that catch broad exceptions swallowed it under load (measured), and the export then went on to
    replace `out`. Returns the previous SIGINT handler (None off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        shutil.rmtree(tmp, ignore_errors=True)
        print("\ninterrupted: nothing was written", file=sys.stderr, flush=True)
        os._exit(130)

    return signal.signal(signal.SIGINT, stop)


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<tmp>\d+)-.+|old-(?P<old>\d+))")


def _remove_stale_siblings(out: Path) -> None:
    """Delete the temporary siblings of `out` whose writing process no longer exists."""
    for sibling in out.parent.glob(f".{glob.escape(out.name)}.*"):
        match = _STALE.fullmatch(sibling.name)
        if not match or match["name"] != out.name:
            continue
        pid = int(match["tmp"] or match["old"])
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def file_entry(root: Path, relative: str) -> dict:
    path = root / relative
    return {"path": relative, "sha256": sha256_file(path), "size": path.stat().st_size}


def copy_model_files(ckpt: Checkpoint, dest: Path, names: list[str] = MODEL_FILES) -> list[dict]:
    """config, generation/preprocessor configs and tokenizer files, so the runtime needs nothing else. `ckpt`: any
    object with the checkpoint directory as `.path`."""
    copied = []
    for name in names:
        src = ckpt.path / name
        if src.is_file():
            shutil.copy(src, dest / name)
            copied.append(file_entry(dest, name))
    return copied


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """The named loggers at ERROR for a block: the converters' progress chatter (our progress bar says what is
    happening)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


TABLE_ROWS = 4096  # rows checked / converted at a time, so a 752 MB table never has a second full copy


def is_bfloat16_exact(table: torch.Tensor) -> bool:
    """Whether every value of `table` is a bfloat16 number (a bf16 checkpoint upcast at load)."""
    return all(torch.equal(rows.to(torch.bfloat16).to(rows.dtype), rows) for rows in table.split(TABLE_ROWS))


def write_embedding_table(model: MiniCPMV | None, dest: Path, dtype: torch.dtype,
                          table: torch.Tensor | None = None) -> dict:
    """Raw little-endian [V, H] table (mmap-able from Swift without a parser): the model's, or `table` (the
    hybrid models' transformers classes: `model.get_input_embeddings().weight`). Written as bfloat16 whenever every
    value is a bfloat16 number (real checkpoints are bf16): the very same lookups at half the bytes of float32 and
    without float16's rounding; otherwise in the export's `dtype`."""
    table = token_embedding_table(model) if table is None else table.detach()
    if dtype != torch.bfloat16 and is_bfloat16_exact(table):
        dtype = torch.bfloat16
    name, dtype_name = "token_embedding.bin", str(dtype).removeprefix("torch.")
    with open(dest / name, "wb") as f:  # row blocks: no converted copy of the whole table
        for rows in table.split(TABLE_ROWS):
            rows = rows.to(dtype).contiguous()
            bits = rows.view(torch.int16) if dtype == torch.bfloat16 else rows  # numpy has no bfloat16: write its bits
            f.write(bits.numpy().astype(bits.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return {**file_entry(dest, name), "format": "raw", "dtype": dtype_name, "shape": list(table.shape)}


VIDEO_FRAME_SLOTS = 6  # frames per group in the exported video graph (the 3D resampler takes up to 6)


def vision_example(model: MiniCPMV, max_patches: int) -> list[dict[str, torch.Tensor]]:
    """Batch-1 inputs of two real slices of a 640x480 noise photo (float32), padded to the patch row: the parity
    example of the batch-1 vision exporters (Core ML, Core AI)."""
    from minicpm.image_processing import process_image  # noqa: PLC0415

    image = np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8)
    slices = process_image(image, model.config.slice)
    return [model.vision_inputs(slices.pixel_values[i:i + 1], slices.tgt_sizes[i:i + 1], pad_to=max_patches)
            for i in range(min(2, len(slices.pixel_values)))]


def video_example(model: MiniCPMV, max_patches: int) -> dict[str, torch.Tensor]:
    """Inputs of `VideoGroupStep` for two groups of noise frames (4 and 2 of the 6 slots used, temporal ids on
    0.1 s steps), float32: the second group has unused slots, so every exporter's parity covers the padding the
    runtime relies on. Batch-1 exporters take one group at a time (`[i:i + 1]`)."""
    from minicpm.image_processing import process_video_group  # noqa: PLC0415
    from minicpm.modeling import video_inputs  # noqa: PLC0415

    rng = np.random.RandomState(1)
    frames = [rng.randint(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(6)]
    groups = [process_video_group(frames[:4], [0, 3, 7, 10], model.config.slice),
              process_video_group(frames[4:], [13, 17], model.config.slice)]
    return video_inputs(groups, VIDEO_FRAME_SLOTS, model.config.slice.patch_size, model.vpm.num_patches_per_side,
                        model.config.hidden_size, max_patches)


def video_preprocessing() -> dict:
    """The model card's video recipe (minicpm.video) as the host must reproduce it."""
    from minicpm import video  # noqa: PLC0415

    return {"frames_per_group": VIDEO_FRAME_SLOTS, "default_packing": video.MAX_NUM_PACKING,
            "max_frames": video.MAX_NUM_FRAMES, "default_fps": video.DEFAULT_FPS, "time_scale": video.TIME_SCALE,
            "max_slice_nums": 1, "use_image_id": False,
            "sampling": "uniform: index int(i * gap + gap / 2), gap = total / count; temporal id = timestamp snapped "
                        "to the nearest 0.1 s step, in steps",
            "temporal_embedding": "sincos_1d(hidden, id) added to each frame's pos_embed rows (id -1: none)",
            "unused_frame_slots": "zero pixels, patch_mask 0"}


def audio_preprocessing(model: MiniCPMV) -> dict:
    """Upstream's audio features (minicpm.audio) as the host must reproduce them, and the prompt's audio tags."""
    from minicpm import audio  # noqa: PLC0415
    from minicpm.prompt import AUDIO_END, AUDIO_START, audio_tag  # noqa: PLC0415

    return {"sample_rate": audio.SAMPLE_RATE, "n_fft": audio.N_FFT, "hop_length": audio.HOP_LENGTH,
            "n_mels": audio.N_MELS, "window": "hann (periodic)", "power": 2.0, "mel_scale": "slaney, 0..8000 Hz",
            "log": "log10(max(power_mel, 1e-10))", "pad_seconds": audio.CHUNK_SECONDS,
            "frames": "ceil(samples / hop_length) (the last STFT frame of the 30 s padding dropped)",
            "log_norm": {"dynamic_range": audio.DYNAMIC_RANGE_DB, "streaming_floor": audio.STREAMING_LOG_FLOOR,
                         "offset": 4.0, "scale": 4.0,
                         "rule": "x = max(x, max(x) - dynamic_range) per 30 s piece (live input: max(x, "
                                 "streaming_floor)), then (x + offset) / scale"},
            "piece_seconds": audio.CHUNK_SECONDS, "max_seconds": audio.MAX_SECONDS,
            "pool": model.config.audio_pool_step,
            "chunk_mel_frames": audio.STREAM_CHUNK_MEL_FRAMES, "tag": audio_tag(model.config),
            "span_start": AUDIO_START, "span_end": AUDIO_END,
            "tokens": "f = ceil(n / 160), c = (f - 1) // 2 + 1, t = (c - pool) // pool + 1"}


def audio_step(model: MiniCPMV, artifact: str, function: str | None = None) -> dict:
    """`schedule.steps.audio`: one call per 1 s chunk of `frames` encoder frames, `tokens` tokens out."""
    chunk, pool = model.config.audio_chunk_frames, model.config.audio_pool_step
    return {"artifact": artifact, **({"function": function} if function else {}), "frames": chunk,
            "tokens": chunk // pool, "pool": pool}


def audio_cache(model: MiniCPMV, dtype: str) -> dict:
    """`schedule.audio_cache`: the encoder K/V of a clip's earlier chunks, one slot per encoder position."""
    from minicpm.split import AudioChunkStep  # noqa: PLC0415

    step = AudioChunkStep(model)
    positions = model.apm.max_source_positions
    return {"layers": len(model.apm.layers), "heads": step.heads, "head_dim": step.head_dim, "positions": positions,
            "shape": [len(model.apm.layers), step.heads, positions, step.head_dim], "dtype": dtype,
            "policy": f"a new 30 s piece (empty cache, positions from 0) every {2 * positions} mel frames, as "
                      "upstream encodes recorded audio"}


def audio_example(model: MiniCPMV) -> list[dict[str, torch.Tensor]]:
    """`AudioChunkStep` inputs of the three chunks of a 2.4 s noise clip (float32): the first (left padding), a
    middle one with a filled cache and the short last one (right padding), as the runtime's AudioChunker cuts
    them. The parity example of every exporter."""
    from minicpm.split import AudioChunkStep  # noqa: PLC0415
    from runtime.audio_chunks import AudioChunker, AudioStepSpec  # noqa: PLC0415

    step = AudioChunkStep(model).eval()
    cache = audio_cache(model, "float32")
    spec = AudioStepSpec(model.apm.num_mel_bins, step.chunk, cache["positions"], step.pool, model.config.hidden_size,
                         tuple(cache["shape"]))
    calls = []

    def run(**inputs: np.ndarray):
        calls.append({k: torch.from_numpy(np.array(v)) for k, v in inputs.items()})
        with torch.no_grad():
            return tuple(t.numpy() for t in step(**calls[-1]))

    mel = np.random.RandomState(2).randn(model.apm.num_mel_bins, 240).astype(np.float32)
    AudioChunker(spec).encode(mel, True, run)
    return calls


def build_manifest(fmt: str, ckpt: Checkpoint, model_name: str, artifacts: dict,
                   files: list[dict], args: argparse.Namespace, dtype: str, parity: dict,
                   quantization: dict | None = None, steps: dict | None = None, model: MiniCPMV | None = None) -> dict:
    """The manifest of an export. `model` (the loaded model) is needed for its audio step (MiniCPM-o): with it and an
    `audio` artifact (or an `audio` step in `steps`), the audio preprocessing, step and cache are described."""
    cfg = ckpt.config
    llm = cfg.llm
    audio = model is not None and ("audio" in artifacts or "audio" in (steps or {}))
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    layers, kv_heads = llm.num_hidden_layers, llm.num_key_value_heads
    special = SpecialTokens.from_dir(ckpt.path)
    vocab = ckpt.tokenizer.get_vocab()
    names = [*vars(special).values(), "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<think>",
             "</think>", "<|listen|>"]
    gen = ckpt.generation_config
    sampling = {"greedy": not gen.get("do_sample", False), "temperature": gen.get("temperature", 1.0),
                "top_p": gen.get("top_p", 1.0), "top_k": gen.get("top_k", 0)}
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": "minicpm-mobile 0.1.0",
        "format": fmt,
        "model": {"name": model_name, "source": str(ckpt.path), "variant": cfg.variant.name,
                  "version": cfg.variant.version, "hidden_size": cfg.hidden_size, "vocab_size": llm.vocab_size,
                  "num_layers": layers, "dtype": dtype},
        "artifacts": artifacts,
        "files": files,
        "tokenizer": {
            "files": [f["path"] for f in files if f["path"] in TOKENIZER_FILES],
            "chat_template": ckpt.tokenizer.chat_template,
            "special_tokens": {t: vocab[t] for t in names if t in vocab},
            "stop_ids": ckpt.stop_ids,
        },
        # the chat template as data (verified against PromptBuilder), for hosts without Jinja
        "prompt": prompt_pieces(ckpt),
        "preprocessing": {
            "patch_size": cfg.slice.patch_size, "scale_resolution": cfg.slice.scale_resolution,
            "max_slice_nums": args.max_slice_nums or cfg.slice.max_slice_nums, "slice_mode": cfg.slice.slice_mode,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "query_num": cfg.query_num,
            "use_image_id": cfg.use_image_id, "image_tag": ckpt.prompts.tag, "max_patches": args.max_patches,
            # the vision position table's side, as Idefics2VisionEmbeddings derives it from the same config
            "num_patches_per_side": cfg.vision.image_size // cfg.vision.patch_size,
            **({"video": video_preprocessing()} if cfg.variant.resampler == "3d" else {}),
            **({"audio": audio_preprocessing(model)} if audio else {}),
        },
        "schedule": {
            "prefill_chunk": args.prefill_chunk,
            "max_context": args.max_context,
            "on_context_full": "error",
            "kv_cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                         "shape": [layers, kv_heads, args.max_context, head_dim], "dtype": dtype},
            # upstream scales prompt text embeddings by scale_emb (when the config has it), never decode steps
            "prompt_embedding_scale": float(cfg.scale_emb) if cfg.scale_emb is not None else 1.0,
            "generated_embedding_scale": 1.0,
            "steps": steps or {"vision": {"artifact": "vision"},
                               "prefill": {"artifact": "llm", "tokens": args.prefill_chunk},
                               "decode": {"artifact": "llm", "tokens": 1},
                               **({"video": {"artifact": "video", "frames": VIDEO_FRAME_SLOTS}}
                                  if "video" in artifacts else {}),
                               **({"audio": audio_step(model, "audio")} if audio else {})},
            **({"audio_cache": audio_cache(model, dtype)} if audio else {}),
            "default_sampling": sampling,
        },
        "quantization": quantization or {"method": "none", "bits": None, "group_size": None, "symmetric": None},
        "parity": parity,
    }


def build_hybrid_manifest(fmt: str, ckpt, model_name: str, artifacts: dict, files: list[dict],
                          args: argparse.Namespace, dtype: str, parity: dict, spec, steps: dict,
                          quantization: dict | None = None) -> dict:
    """The manifest of a MiniCPM-V 4.6 / 4.7 export (`ckpt`: a `minicpm.v4_6.HybridCheckpoint`, `spec`: the LLM
    step's `StateSpec`). The schedule describes the per-layer state as data (`schedule.state` =
    `spec.to_dict()`) and the positions (`schedule.positions`); preprocessing is the model's own processor, rebuilt
    by the runtime from the copied files. A `steps.vision` entry (its layout as data, see export/onnx_hybrid.py)
    adds "image" to `schedule.modalities` and its patch row to `preprocessing.max_patches`."""
    cfg, text = ckpt.config, ckpt.config.text_config
    vocab = ckpt.tokenizer.get_vocab()
    names = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>",
             *(getattr(ckpt.tokenizer, n, None) for n in ("image_token", "video_token"))]
    gen = ckpt.generation_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    processor_files = [f["path"] for f in files if f["path"] in ("preprocessor_config.json", "processor_config.json",
                                                                  "video_preprocessor_config.json")]
    modalities = ["text", *(["image"] if "vision" in steps else [])]
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": "minicpm-mobile 0.1.0",
        "format": fmt,
        "model": {"name": model_name, "source": str(ckpt.path), "variant": ckpt.variant.name,
                  "version": ckpt.variant.version, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
                  "num_layers": text.num_hidden_layers, "dtype": dtype},
        "artifacts": artifacts,
        "files": files,
        "tokenizer": {
            "files": [f["path"] for f in files if f["path"] in TOKENIZER_FILES],
            "chat_template": ckpt.processor.chat_template or ckpt.tokenizer.chat_template,
            "special_tokens": {t: vocab[t] for t in names if t in vocab},
            "stop_ids": ckpt.stop_ids,
        },
        "preprocessing": {"processor": type(ckpt.processor).__name__, "files": processor_files,
                          "downsample_mode": steps.get("vision", {}).get("downsample_mode", cfg.downsample_mode),
                          **({"max_patches": steps["vision"]["max_patches"]} if "vision" in steps else {})},
        "schedule": {
            "prefill_chunk": args.prefill_chunk,
            "max_context": args.max_context,
            "on_context_full": "error",
            "modalities": modalities,
            # what each LLM call carries in and out besides the embeddings (minicpm/cache.py)
            "state": spec.to_dict(),
            "positions": {
                "kind": "mrope", "rows": ["temporal", "height", "width"],
                "mrope_section": list(rope.get("mrope_section") or []),
                "interleaved": bool(rope.get("mrope_interleaved", False)),
                "canvas": ckpt.variant.canvas_positions,
                "rule": "text tokens: sequence index + delta on all three rows; canvas: the image tokens of a "
                        "turn take the model's canvas positions (get_rope_index over the turn's tokens) offset by the "
                        "turn's first position (its sequence index + delta), then delta += max turn position + 1 - "
                        "turn length; otherwise (4.6) image tokens are text tokens and delta stays 0",
            },
            "prompt_embedding_scale": 1.0,
            "generated_embedding_scale": 1.0,
            "steps": steps,
            "default_sampling": {"greedy": not gen.get("do_sample", False), "temperature": gen.get("temperature", 1.0),
                                 "top_p": gen.get("top_p", 1.0), "top_k": gen.get("top_k", 0)},
        },
        "quantization": quantization or {"method": "none", "bits": None, "group_size": None, "symmetric": None},
        "parity": parity,
    }


def print_summary(title: str, rows: list[tuple[str, int, float | None, float]]) -> None:
    """rows: (artifact, size in bytes, max abs error vs torch or None, seconds)."""
    print(f"\n{title}")
    print(f"{'artifact':<28}{'size':>12}{'max |err|':>14}{'time':>10}")
    for name, size, err, seconds in rows:
        err_s = f"{err:.2e}" if err is not None else "-"
        print(f"{name:<28}{_human(size):>12}{err_s:>14}{seconds:>9.1f}s")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def max_abs_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
