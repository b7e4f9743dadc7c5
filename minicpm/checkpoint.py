"""Find a checkpoint (directory, hub id, short name or tiny name), load it strictly, save it back.

Only safetensors are read (never unpickled). Weights are streamed tensor by tensor into a model built
without random initialisation, so loading holds about one copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from minicpm.config import VARIANTS, MiniCPMConfig
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.prompt import PromptBuilder, SpecialTokens, load_tokenizer
from minicpm.v4_6 import SHORT_NAMES as HYBRID_SHORT_NAMES

SHORT_NAMES = {v.hub_id.split("/")[1]: v.hub_id for v in VARIANTS} | HYBRID_SHORT_NAMES
# Modules of the o-models that this package does not build (the speech head comes later).
SKIPPED_PREFIXES = ("tts.",)
# The audio encoder and projection: loaded strictly when the config initialises audio, skipped otherwise.
AUDIO_PREFIXES = ("apm.", "audio_projection_layer.", "audio_avg_pooler.")
# Buffers some saved checkpoints carry that are recomputed here (position ranges, rotary frequencies).
DERIVED_BUFFERS = re.compile(r"(^vpm\.embeddings\.position_ids$|\.rotary_emb\.inv_freq$|^resampler\.pos_embed$)")
TIED_HEAD = "llm.lm_head.weight"  # not stored when the head shares the embedding table
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]


def resolve_model(name: str | os.PathLike) -> Path:
    """A local snapshot directory for `name`: a path, `tiny-*`, `full-minicpm-v-4`, a short name or a hub id."""
    name = str(name)
    if os.path.isdir(name):
        return Path(name)
    from minicpm.tiny import ALL_TINY_MODELS as TINY_MODELS  # noqa: PLC0415 (tiny imports this module)
    from minicpm.tiny import ensure_tiny  # noqa: PLC0415

    if name in TINY_MODELS:
        return ensure_tiny(name)
    from minicpm.full_size import FULL_SIZE_MODELS, ensure_full_size  # noqa: PLC0415

    if name in FULL_SIZE_MODELS:  # random weights in the V-4.0 shapes, ~7 GB built on first use
        return ensure_full_size(name)
    repo_id = SHORT_NAMES.get(name, name)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise UserError(f"model not found: {name} (not a directory, a hub id like openbmb/MiniCPM-V-4, "
                        f"a short name ({', '.join(SHORT_NAMES)}) or a tiny model ({', '.join(TINY_MODELS)}))")
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 (any cache miss means: try the network, if allowed)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UserError(f"{repo_id} is not in the local Hugging Face cache (no such directory either) and "
                        "HF_HUB_OFFLINE is set: download it on a connected machine, or put the snapshot in a "
                        "directory and pass --model DIR")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{repo_id}: not in the local Hugging Face cache and could not be downloaded "
                        f"({type(e).__name__}); put the snapshot in a directory and pass --model DIR") from None


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{path}: shard(s) listed in model.safetensors.index.json are missing: "
                            f"{', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickled:
        raise UserError(f"{path}: only safetensors are loaded, found pickled weights ({', '.join(pickled)}); "
                        "convert them to safetensors first")
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, sf.get_tensor(key)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (a corrupt shard must be named)
            raise UserError(f"{f}: cannot read safetensors ({e})") from None


class TensorReader:
    """The checkpoint's tensors by name, one at a time, in their stored dtype (shapes from the headers).

    safetensors maps the shard and `get` returns a tensor backed by that mapping: its pages count in the process's
    RSS until the tensor is dropped, so a caller converts it and lets it go, and at most one stored tensor is held.
    """

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in checkpoint_files(path):
            with _reading(f), safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self.files[key] = f
                    self.shapes[key] = tuple(sf.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        f = self.files[key]
        with _reading(f), safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor(key)


class _reading:
    """A corrupt shard is one UserError naming it."""

    def __init__(self, f: Path):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and not issubclass(kind, UserError) and issubclass(kind, Exception):
            raise UserError(f"{self.f}: cannot read safetensors ({e})") from None


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # prefix -> count, skipped on purpose

    def describe(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        parts += [f"skipped {n} {what}* tensors (not built here)" if what.endswith(".")
                  else f"skipped {n} {what} (recomputed here)" for what, n in self.skipped.items()]
        return ", ".join(parts)


def _skip_reason(key: str, config: MiniCPMConfig) -> str | None:
    if DERIVED_BUFFERS.search(key):
        return "derived buffers"
    for prefix in SKIPPED_PREFIXES + (() if config.has_audio else AUDIO_PREFIXES):
        if key.startswith(prefix):
            return prefix
    if config.drop_vision_last_layer:
        prefix = f"vpm.encoder.layers.{config.vision_layers}."
        if key.startswith(prefix):
            return prefix  # upstream drops this layer (drop_vision_last_layer)
    return None


def _resolve_dtype(dtype: str | torch.dtype | None, path: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # Small checkpoints run in float32; full-size ones in bfloat16 (float32 would not fit in memory).
        size = sum(f.stat().st_size for f in checkpoint_files(path))
        return torch.float32 if size < 2 * 1024**3 else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r} (use auto, float32, float16 or bfloat16)") from None


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto") -> tuple[MiniCPMV, LoadReport]:
    """Build the model from `path`/config.json and load its safetensors strictly."""
    path = Path(path)
    config = MiniCPMConfig.from_dir(path)
    model = _build(path, config, _resolve_dtype(dtype, path))
    params = dict(model.state_dict())
    tied = TIED_HEAD if config.llm.tie_word_embeddings else None
    report, _ = load_strictly(path, params, lambda key: _skip_reason(key, config), config.variant.name, tied)
    if tied:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    model.eval()
    return model, report


def load_skeleton(path: str | os.PathLike) -> tuple[MiniCPMV, TensorReader, LoadReport]:
    """The float32 model of `path` with every parameter on the meta device (no weight memory; buffers such as
    the rotary frequencies are real) and a reader of its tensors, checked as strictly as `load_model` checks
    them. minicpm.lazy_model fills parts of it from the reader and empties them again."""
    path = Path(path)
    config = MiniCPMConfig.from_dir(path)
    with _parameters_on_meta():
        model = _build(path, config, torch.float32)
    reader = TensorReader(path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = TIED_HEAD if config.llm.tie_word_embeddings else None
    report = check_strictly(path, reader, shapes, lambda key: _skip_reason(key, config), config.variant.name, tied)
    if tied:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    return model.eval(), reader, report


def _build(path: Path, config: MiniCPMConfig, torch_dtype: torch.dtype) -> MiniCPMV:
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # allocate once, in the final dtype
    try:
        with no_init_weights():
            return MiniCPMV(config)
    except Exception as e:  # noqa: BLE001 (config.json is user input: a config the modules cannot be built from)
        raise UserError(f"{path}: cannot build the model its config.json describes ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'bad value'})") from None
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every Parameter registered inside the block lives on the meta device. Buffers stay real: the rotary
    frequencies and position tables are computed in the constructors, not stored in the checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_strictly(path: Path, params: dict[str, torch.Tensor], skip_reason, name: str,
                  tied: str | None = None) -> tuple[LoadReport, set[str]]:
    """Copy every safetensors tensor of `path` into `params` (a model's state_dict) by name; `skip_reason(key)`
    names the tensors skipped on purpose. Shape mismatches, missing keys (but the `tied` head) and unexpected keys
    are one UserError naming them. Returns the report and the keys loaded."""
    report, seen, unexpected, mismatched = LoadReport(), set(), [], []
    for key, tensor in iter_tensors(path):
        reason = skip_reason(key)
        if reason:
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        if key not in params:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(params[key].shape):
            mismatched.append(f"{key} (checkpoint {list(tensor.shape)}, model {list(params[key].shape)})")
            continue
        with torch.no_grad():
            params[key].copy_(tensor)
        seen.add(key)
        report.loaded += 1
    _refuse_mismatch(path, name, mismatched, [k for k in params if k not in seen and k != tied], unexpected)
    return report, seen


def check_strictly(path: Path, reader: TensorReader, shapes: dict[str, tuple[int, ...]], skip_reason, name: str,
                   tied: str | None = None) -> LoadReport:
    """`load_strictly`'s checks from the shards' headers alone (no tensor is read): `shapes` is the model's
    state_dict as name -> shape. Same one UserError for mismatched, missing and unexpected keys."""
    report, seen, unexpected, mismatched = LoadReport(), set(), [], []
    for key, shape in reader.shapes.items():
        reason = skip_reason(key)
        if reason:
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
        elif key not in shapes:
            unexpected.append(key)
        elif shape != tuple(shapes[key]):
            mismatched.append(f"{key} (checkpoint {list(shape)}, model {list(shapes[key])})")
        else:
            seen.add(key)
            report.loaded += 1
    _refuse_mismatch(path, name, mismatched, [k for k in shapes if k not in seen and k != tied], unexpected)
    return report


def _refuse_mismatch(path: Path, name: str, mismatched: list[str], missing: list[str], unexpected: list[str]) -> None:
    problems = [f"shape mismatch: {', '.join(mismatched[:5])}"] if mismatched else []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""))
    if problems:
        raise UserError(f"{path}: checkpoint does not match {name}: " + "; ".join(problems))


def save_model(model: MiniCPMV, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json, model.safetensors (upstream names) and tokenizer files; atomic per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.llm.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    state.update(extra or {})
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(model.config.raw, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


@dataclass
class Checkpoint:
    """A resolved checkpoint directory with its config, tokenizer and prompt builder (weights on demand)."""

    path: Path
    config: MiniCPMConfig
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptBuilder
    generation_config: dict

    @classmethod
    def open(cls, name: str | os.PathLike) -> Checkpoint:
        path = resolve_model(name)
        config = MiniCPMConfig.from_dir(path)
        tokenizer = load_tokenizer(path)
        gen = path / "generation_config.json"
        generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
        return cls(path, config, tokenizer, PromptBuilder(tokenizer, config, SpecialTokens.from_dir(path)),
                   generation_config)

    @property
    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.config, self.generation_config)

    def load_model(self, dtype: str | torch.dtype | None = "auto") -> tuple[MiniCPMV, LoadReport]:
        return load_model(self.path, dtype)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, config: MiniCPMConfig,
                   generation_config: dict | None = None) -> list[int]:
    """Stop ids: upstream chat()'s terminators for the variant plus the checkpoint's generation_config eos ids."""
    vocab = tokenizer.get_vocab()
    terminators = ("<|im_end|>", "</s>") if config.variant.llm == "llama" else ("<|im_end|>", "<|endoftext|>")
    ids = [vocab[t] for t in terminators if t in vocab]
    eos = (generation_config or {}).get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not ids:
        raise UserError("the checkpoint defines no stop token (no <|im_end|> and no generation_config eos)")
    return sorted(set(ids))
