"""MiniCPM-V 4.6 and 4.7: the hybrid-attention members of the family, through transformers' own classes.

Both are native in the pinned transformers (`MiniCPMV4_6ForConditionalGeneration`,
`MiniCPMV4_7ForConditionalGeneration`): a NaViT ViT with a window-attention merger after `insert_layer_id`, an MLP
merger (`downsample_mode` 16x or 4x) and a Qwen3.5 text model whose `layer_types` mix gated delta-net linear
attention (a causal conv state and a recurrent state per layer) with gated full attention. 4.7 differs only in
its positions: image tokens get canvas M-RoPE positions (`get_rope_index`). This module keeps one readable file for
both, as mlx-lm keeps one file per architecture:

- variants (model_type -> our name, short name, hub id, transformers classes) and config parsing (one-line
  `UserError`s, size bounds);
- strict loading of the real checkpoint layout (`model.vision_tower.*`, `model.merger.*`,
  `model.language_model.*`, `lm_head.*`): every tensor consumed, none missing, as `minicpm.checkpoint`;
- the processor (`AutoProcessor`, with a torchvision-free frame path where transformers' video processor cannot
  be built), chat prompts through the checkpoint's chat template, prompt embeddings and positions on the host;
- tiny checkpoints `tiny-minicpm-v-4.6` / `tiny-minicpm-v-4.7` in the real layout, built offline.

The LLM step with per-layer state lives in `minicpm.hybrid_step`, the state kinds in `minicpm.cache`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from minicpm.errors import UserError


@dataclass(frozen=True)
class HybridVariant:
    """One hybrid member of the family: its config.json `model_type` and the transformers classes built from it."""

    name: str  # our name, e.g. "minicpm-v-4.6"
    model_type: str  # config.json "model_type"
    short_name: str  # e.g. "MiniCPM-V-4_6"
    hub_id: str
    version: float
    canvas_positions: bool  # 4.7: image tokens take canvas M-RoPE positions from the model's own position code

    @property
    def config_class(self) -> type[PretrainedConfig]:
        import transformers  # noqa: PLC0415

        return getattr(transformers, f"MiniCPMV{self.model_type.removeprefix('minicpmv')}Config")

    @property
    def model_class(self) -> type[PreTrainedModel]:
        import transformers  # noqa: PLC0415

        return getattr(transformers, f"MiniCPMV{self.model_type.removeprefix('minicpmv')}ForConditionalGeneration")


HYBRID_VARIANTS = [
    HybridVariant("minicpm-v-4.6", "minicpmv4_6", "MiniCPM-V-4_6", "openbmb/MiniCPM-V-4.6", 4.6, False),
    HybridVariant("minicpm-v-4.7", "minicpmv4_7", "MiniCPM-V-4_7", "openbmb/MiniCPM-V-4.7-1B", 4.7, True),
]
HYBRID_MODEL_TYPES = {v.model_type: v for v in HYBRID_VARIANTS}
SHORT_NAMES = {v.short_name: v.hub_id for v in HYBRID_VARIANTS}
# Tensors a checkpoint may carry that these classes do not build: Qwen3.5's multi-token-prediction head
# (transformers itself ignores `mtp.*` on load). Skipped on purpose and counted, never silently.
SKIPPED = re.compile(r"(^|\.)mtp\.")
DERIVED_BUFFERS = re.compile(r"\.rotary_emb\.(inv_freq|original_inv_freq)$")
LAYER_KINDS = ("linear_attention", "full_attention")


def is_hybrid_config(raw: object) -> bool:
    return isinstance(raw, dict) and raw.get("model_type") in HYBRID_MODEL_TYPES


def find_hybrid_variant(raw: dict) -> HybridVariant:
    model_type = raw.get("model_type")
    if model_type not in HYBRID_MODEL_TYPES:
        known = ", ".join(HYBRID_MODEL_TYPES)
        raise UserError(f"config.json: model_type {model_type!r} is not a hybrid MiniCPM-V model (expected {known})")
    variant = HYBRID_MODEL_TYPES[model_type]
    if "version" in raw:  # not written by transformers; checked when a converted checkpoint carries one
        try:
            version = float(raw["version"])
        except (TypeError, ValueError):
            raise UserError(f"config.json: version {raw['version']!r} is not a number") from None
        if abs(version - variant.version) > 1e-6:
            raise UserError(f"config.json: unknown version {raw['version']!r} for model_type {model_type!r} "
                            f"(supported: {variant.version})")
    return variant


# Sizes the model is built from: each a positive int, bounded so a hostile config cannot ask for petabytes.
_TEXT_LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1 << 10,
                "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10, "vocab_size": 1 << 22,
                "head_dim": 1 << 12, "linear_conv_kernel_dim": 64, "linear_key_head_dim": 1 << 12,
                "linear_value_head_dim": 1 << 12, "linear_num_key_heads": 1 << 10, "linear_num_value_heads": 1 << 10}
_VISION_LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1 << 10,
                  "num_attention_heads": 1 << 10, "patch_size": 1 << 10, "image_size": 1 << 14}


def parse_config(raw: object) -> tuple[HybridVariant, PretrainedConfig]:
    """config.json's contents -> (variant, transformers config); anything the config class rejects is one line."""
    if not isinstance(raw, dict):
        raise UserError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    variant = find_hybrid_variant(raw)
    try:
        config = variant.config_class.from_dict({k: v for k, v in raw.items() if k != "version"})
    except Exception as e:  # noqa: BLE001 (config.json is user input: whatever it breaks is named in one line)
        raise UserError(f"config.json is not a valid {variant.name} config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'bad value'})") from None
    _check_sizes(config)
    return variant, config


def _check_sizes(config: PretrainedConfig) -> None:
    for part, section, limits in (("text_config.", config.text_config, _TEXT_LIMITS),
                                  ("vision_config.", config.vision_config, _VISION_LIMITS)):
        for name, limit in limits.items():
            value = getattr(section, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise UserError(f"config.json: {part}{name} must be an integer in 1..{limit}, got {value!r}")
    text = config.text_config
    if len(text.layer_types) != text.num_hidden_layers or not set(text.layer_types) <= set(LAYER_KINDS):
        raise UserError(f"config.json: text_config.layer_types must list {text.num_hidden_layers} entries, each one "
                        f"of {', '.join(LAYER_KINDS)}")
    if text.num_attention_heads % text.num_key_value_heads or text.linear_num_value_heads % text.linear_num_key_heads:
        raise UserError("config.json: attention heads must be a multiple of the key/value heads")
    if config.downsample_mode not in ("16x", "4x"):
        raise UserError(f"config.json: downsample_mode {config.downsample_mode!r} is not '16x' or '4x'")


def load_config(path: str | os.PathLike) -> tuple[HybridVariant, PretrainedConfig]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UserError(f"{path}: no config.json (not a MiniCPM checkpoint directory)")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{f}: invalid JSON ({str(e).splitlines()[0][:200]})") from None
    return parse_config(raw)


# ---------------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------------


def _tied_head(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _skip_reason(key: str) -> str | None:
    """Why a checkpoint tensor is skipped on purpose (recomputed buffers, the multi-token-prediction head)."""
    if DERIVED_BUFFERS.search(key):
        return "derived buffers"
    return "mtp." if SKIPPED.search(key) else None


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto") -> tuple[PreTrainedModel, object]:
    """Build transformers' own class from config.json and load the safetensors strictly (no random init, one copy).
    Returns the model and a `minicpm.checkpoint.LoadReport`."""
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    from minicpm.checkpoint import _resolve_dtype, load_strictly  # noqa: PLC0415 (checkpoint imports us)

    path = Path(path)
    variant, config = load_config(path)
    torch_dtype = _resolve_dtype(dtype, path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with no_init_weights():
            model = variant.model_class(config)
    except Exception as e:  # noqa: BLE001 (a config the modules cannot be built from)
        raise UserError(f"{path}: cannot build the model its config.json describes ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'bad value'})") from None
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.state_dict())
    tied = "lm_head.weight" if _tied_head(config) else None
    report, seen = load_strictly(path, params, _skip_reason, variant.name, tied)
    if tied and "lm_head.weight" not in seen:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.eval()
    return model, report


# ---------------------------------------------------------------------------------------------------------
# Processor, prompts, host-side embeddings and positions
# ---------------------------------------------------------------------------------------------------------


def _frames_video_processor_class() -> type:
    from transformers.video_processing_utils import VideoProcessorMixin  # noqa: PLC0415

    class FramesVideoProcessor(VideoProcessorMixin):
        """Stand-in for `MiniCPMV4_6VideoProcessor` where torchvision is missing (its backend): decoded frames
        (a list of PIL images or HWC arrays per video, no frame sampling, no frame stacking) go through the model's
        own image processor with the video settings, and come back under the video processor's keys. The only
        difference from the real one is the resize backend (PIL instead of torchvision bicubic)."""

        model_input_names = ["pixel_values_videos", "target_sizes_videos"]

        def __init__(self, image_processor=None, **kwargs):
            super().__init__(**kwargs)
            self.image_processor = image_processor

        def __call__(self, videos, **kwargs):
            return self.preprocess(videos, **kwargs)

        def preprocess(self, videos, return_tensors=None, **kwargs):
            if self.image_processor is None:
                raise UserError("video input needs torchvision for transformers' video processor, or decoded frames "
                                "with the checkpoint's image processor")
            if isinstance(videos, np.ndarray) and videos.ndim == 4 or not isinstance(videos, (list, tuple)):
                videos = [videos]
            elif videos and not isinstance(videos[0], (list, tuple, np.ndarray)) or (
                    isinstance(videos[0], np.ndarray) and videos[0].ndim == 3):
                videos = [videos]
            frames = [frame for video in videos for frame in video]
            settings = {k: getattr(self, k) for k in ("slice_mode", "max_slice_nums", "scale_resolution",
                                                      "patch_size", "downsample_mode") if hasattr(self, k)}
            out = self.image_processor(frames, return_tensors="pt", **settings)
            from transformers import BatchFeature  # noqa: PLC0415

            return BatchFeature(data={
                "pixel_values_videos": out["pixel_values"],
                "target_sizes_videos": out["target_sizes"],
                "grids_videos": torch.tensor(out["grids"], dtype=torch.int32).reshape(-1, 2),
                "num_patches_per_frame": torch.tensor(out["num_patches_per_image"], dtype=torch.int32),
                "num_frames_per_video": [len(v) for v in videos],
            }, skip_tensor_conversion=["grids_videos", "num_patches_per_frame", "num_frames_per_video"])

    return FramesVideoProcessor


def load_processor(path: str | os.PathLike):
    """The checkpoint's own processor (`AutoProcessor`, offline). transformers' video processor needs torchvision;
    without it the same processor class is built with `FramesVideoProcessor` (same settings, the image processor's
    code) in place of the video processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer  # noqa: PLC0415

    path = str(path)
    try:
        try:
            return AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError as e:
            if "orchvision" not in str(e):
                raise
        _, config = load_config(path)
        processor_class = _processor_class(config)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        video_file = Path(path) / "video_preprocessor_config.json"
        settings = json.loads(video_file.read_text()) if video_file.is_file() else {}
        settings = {k: v for k, v in settings.items() if k in ("slice_mode", "max_slice_nums", "scale_resolution",
                                                                 "patch_size", "downsample_mode", "use_image_id")}
        video_processor = _frames_video_processor_class()(image_processor=image_processor, **settings)
        template_file = Path(path) / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else tokenizer.chat_template
        return processor_class(image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
                               chat_template=template)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (missing or broken processor files are named in one line)
        raise UserError(f"{path}: cannot load the processor ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'bad value'})") from None


def _processor_class(config: PretrainedConfig) -> type:
    """The model's processor class, accepting the torchvision-free video stand-in (its base-class check looks the
    video processor base up in a mapping that is a placeholder without torchvision)."""
    import transformers  # noqa: PLC0415

    base = getattr(transformers, f"MiniCPMV{config.model_type.removeprefix('minicpmv')}Processor")

    class FramesProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and type(argument).__name__ == "FramesVideoProcessor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    FramesProcessor.__name__ = FramesProcessor.__qualname__ = base.__name__
    return FramesProcessor


def prompt_inputs(processor, messages: list[dict], images=None, videos=None, enable_thinking: bool = False,
                  add_generation_prompt: bool = True):
    """Chat messages (transformers' content-list format) -> the processor's tensors, through the checkpoint's chat
    template and the model's own image/video processing. One sequence, no padding."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    return processor(text=[text], images=images, videos=videos, return_tensors="pt")


@torch.no_grad()
def prompt_embeddings(model: PreTrainedModel, inputs) -> torch.Tensor:
    """[1, S, H]: token embeddings with the vision features scattered into the image/video placeholders, exactly
    as the model's forward does before its text model (host side of the device schedule)."""
    inner = model.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    for kind, pixels, sizes, token_id in (
            ("image", "pixel_values", "target_sizes", inner.config.image_token_id),
            ("video", "pixel_values_videos", "target_sizes_videos", inner.config.video_token_id)):
        if inputs.get(pixels) is None:
            continue
        fn = inner.get_image_features if kind == "image" else inner.get_video_features
        features = torch.cat(fn(inputs[pixels][:1], inputs[sizes]).pooler_output, dim=0).to(embeds.dtype)
        mask = inner.get_placeholder_mask(ids, embeds, features, token_id)
        embeds = embeds.masked_scatter(mask, features)
    return embeds


@torch.no_grad()
def prompt_positions(model: PreTrainedModel, inputs) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of the prompt [3, S] (temporal, height, width) and the delta that decode adds to a token's
    sequence index. 4.6: text positions on all three rows. 4.7: the model's own canvas positions for images."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    has_visual = inputs.get("target_sizes") is not None or inputs.get("target_sizes_videos") is not None
    if getattr(model.model, "get_rope_index", None) is None or not has_visual:
        return torch.arange(length).expand(3, -1).clone(), 0
    positions, deltas = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], target_sizes=inputs.get("target_sizes"),
        target_sizes_videos=inputs.get("target_sizes_videos"), attention_mask=inputs.get("attention_mask"))
    return positions[:, 0], int(deltas[0, 0])


def canvas_positions(model_class: type[PreTrainedModel], config: PretrainedConfig, input_ids: list[int],
                     target_sizes, downsample_mode: str | None = None) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, S] (int64) of one token sequence holding image placeholders, and its delta (max
    position + 1 - S), through the model's own canvas position code (`get_rope_index` of 4.7's inner model) on the
    host: no weights needed, that code reads only `self.config`. `target_sizes` [N, 2]: every slice's patch grid, in
    prompt order; the modality of each token is its placeholder id (the processor's `mm_token_type_ids`).

    Positions are relative to the sequence start and shift with it: for a sequence that does not open with an image
    (a chat turn never does), get_rope_index over `history + turn` gives the turn's tokens exactly these positions
    plus the history's next position, which is how the runtime places a later turn (see runtime/session.py)."""
    inner_class = getattr(sys.modules[model_class.__module__], model_class.__name__.replace(
        "ForConditionalGeneration", "Model"))
    code = inner_class.__new__(inner_class)  # the class's methods over a config, no modules built
    nn.Module.__init__(code)
    code.config = config
    ids = torch.tensor([input_ids], dtype=torch.long)
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == config.image_token_id] = 1
    types[ids == config.video_token_id] = 2
    sizes = torch.as_tensor(np.asarray(target_sizes, dtype=np.int64)).reshape(-1, 2)
    positions, deltas = code.get_rope_index(ids, mm_token_type_ids=types, target_sizes=sizes,
                                            downsample_mode=downsample_mode)
    return positions[:, 0].numpy().astype(np.int64), int(deltas[0, 0])


@dataclass
class HybridImage:
    """One image of a hybrid prompt as the model's image processor prepared it: its slices in the processor's order
    (the source image first, then the grid cells row by row), each `pixel_values` [1, 3, p, h*w*p] (the packed
    patch row of that slice) with its patch grid (h, w) in `tgt_sizes`. The session's vision schedule reads these
    (`minicpm.hybrid_vision.vision_inputs` per slice)."""

    pixel_values: list[torch.Tensor]
    tgt_sizes: list[tuple[int, int]]
    temporal_ids: None = None  # an image, not a video frame group (the older models' prompts share this field)

    def slices(self) -> list[dict]:
        """One `{"pixel_values", "target_sizes"}` dict per slice, as `minicpm.hybrid_vision.split_slices` makes."""
        return [{"pixel_values": pv, "target_sizes": torch.tensor([size])}
                for pv, size in zip(self.pixel_values, self.tgt_sizes, strict=True)]


class HybridPromptBuilder:
    """The runtime's prompts for a 4.6 / 4.7 checkpoint, through the model's own processor and chat template, in the
    `minicpm.prompt.PromptBuilder` interface the session calls (`build` for a conversation's first turn,
    `build_turn` for a continuation of a state that ends with the last generated token).

    Messages are the toolkit's (`content`: a string or a list of strings, PIL images / arrays and typed dicts) and
    become transformers' content lists. Images go through the processor with the prompt text: it slices them and
    expands each placeholder (one run of image tokens per slice, in the order of `pixel_values`); the prompt's
    `image_bounds` are those runs, its `images` one `HybridImage` per image. Video items are refused in one line
    (the hybrid video schedule is not built yet)."""

    # A string no tokenizer merges with its neighbours, to find what the template puts after a message's content.
    _SENTINEL = "\u2063MINICPM\u2063"

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def _chat(self, messages: list[dict]) -> tuple[list[dict], list]:
        from minicpm.prompt import is_image  # noqa: PLC0415

        out, images = [], []
        for m in messages:
            content = m["content"]
            items = [content] if isinstance(content, str) or is_image(content) else list(content)
            converted = []
            for item in items:
                if isinstance(item, str):
                    converted.append({"type": "text", "text": item})
                elif isinstance(item, dict) and item.get("type") == "text":
                    converted.append(item)
                elif is_image(item):
                    image = item.get("image") if isinstance(item, dict) else item
                    if not isinstance(image, Image.Image | np.ndarray):
                        raise UserError("an {'type': 'image'} content item needs its 'image' (a PIL image or array)")
                    images.append(image)
                    converted.append({"type": "image"})
                else:
                    kind = item.get("type", "unknown") if isinstance(item, dict) else type(item).__name__
                    raise UserError(f"MiniCPM-V 4.6 / 4.7 prompts take text and images for now ({kind} input is "
                                    "not supported)")
            out.append({"role": m["role"], "content": converted})
        return out, images

    def _render(self, messages: list[dict], enable_thinking: bool, generation: bool = True) -> tuple[str, list]:
        chat, images = self._chat(messages)
        return self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation,
                                                  enable_thinking=enable_thinking), images

    def _prompt(self, text: str, images: list, first_image: int = 0, max_slice_nums: int | None = None):
        """Tokens of `text` with its image placeholders expanded by the processor. Image ids (`use_image_id`) count
        the conversation's images: the processor numbers each call's images from 0, so with earlier images in the
        state the tags are written here (`<image_id>N</image_id>` before each placeholder, as the processor writes
        them for one whole-conversation call) and the processor adds none."""
        from minicpm.prompt import Prompt  # noqa: PLC0415

        processor, kwargs = self.processor, {}
        if images:
            if processor.default_use_image_id:
                parts = text.split(processor.image_token)
                text = parts[0] + "".join(f"{processor.image_id_start_token}{first_image + i}"
                                          f"{processor.image_id_end_token}{processor.image_token}{part}"
                                          for i, part in enumerate(parts[1:]))
            kwargs = {"images": images, "use_image_id": False,
                      **({"max_slice_nums": max_slice_nums} if max_slice_nums else {})}
        out = processor(text=[text], return_tensors="pt", **kwargs)
        ids = out["input_ids"][0].tolist()
        bounds = _runs(ids, processor.image_token_id)
        hybrid_images = _group_slices(out, ids, bounds, processor.tokenizer.convert_tokens_to_ids(
            processor.image_start_token)) if images else []
        if len(hybrid_images) != len(images):
            raise UserError(f"the processor expanded {len(hybrid_images)} image placeholders for {len(images)} images "
                            "(the chat template must write one per image item)")
        return Prompt(ids, bounds, hybrid_images, text)

    def reference_inputs(self, messages: list[dict], enable_thinking: bool = False) -> dict:
        """What transformers' own `generate` takes for the conversation `messages`: the chat template with its
        generation prompt through the model's processor, images included (the eager reference of an export)."""
        text, images = self._render(messages, enable_thinking)
        return dict(self.processor(text=[text], images=images or None, return_tensors="pt"))

    def build(self, messages: list[dict], max_slice_nums: int | None = None, enable_thinking: bool = False,
              stream_input: bool | None = None, tts_template: bool | None = None):
        """The whole prompt of a conversation's first turn: the chat template with its generation prompt."""
        return self._prompt(*self._render(messages, enable_thinking), 0, max_slice_nums)

    def build_turn(self, messages: list[dict], first_image: int, max_slice_nums: int | None = None,
                   enable_thinking: bool = False, stream_input: bool | None = None,
                   tts_template: bool | None = None):
        """The tokens continuing a conversation whose state ends with the last generated token: the template's
        end of an assistant message (the stop token is never fed back), then the new messages as the template
        renders them, with its generation prompt. `first_image`: images already in the conversation."""
        text, images = self._render(messages, enable_thinking)
        return self._prompt(self.answer_footer() + text, images, first_image, max_slice_nums)

    def answer_footer(self) -> str:
        """What the chat template writes after an assistant message's content (ChatML: "<|im_end|>\\n")."""
        text, _ = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": self._SENTINEL}],
                               False, generation=False)
        if self._SENTINEL not in text:
            raise UserError("the chat template drops assistant messages: cannot continue a conversation")
        return text.rsplit(self._SENTINEL, 1)[1]


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of `token` in `ids`."""
    out, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            out.append((start, i))
            start = None
    return out


def _group_slices(processed, ids: list[int], bounds: list[tuple[int, int]], image_start: int) -> list[HybridImage]:
    """The processor's packed slices, one `HybridImage` per image: a run of placeholders right after the image
    start marker opens an image (its source image), the runs after `<slice>` markers are its grid cells."""
    from minicpm.hybrid_vision import split_slices  # noqa: PLC0415

    slices = split_slices(processed)
    if len(slices) != len(bounds):
        raise UserError(f"the processor made {len(slices)} slices but the prompt holds {len(bounds)} placeholder runs")
    images = []
    for (start, _), one in zip(bounds, slices, strict=True):
        if start == 0 or ids[start - 1] == image_start or not images:
            images.append(HybridImage([], []))
        h, w = (int(v) for v in one["target_sizes"][0])
        images[-1].pixel_values.append(one["pixel_values"])
        images[-1].tgt_sizes.append((h, w))
    return images


def stop_token_ids(tokenizer, generation_config: dict | None = None) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    eos = (generation_config or {}).get("eos_token_id")
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not ids:
        raise UserError("the checkpoint defines no stop token (no <|im_end|> and no generation_config eos)")
    return sorted(set(ids))


@dataclass
class HybridCheckpoint:
    """A resolved 4.6/4.7 checkpoint directory with its config and processor (weights on demand)."""

    path: Path
    variant: HybridVariant
    config: PretrainedConfig
    processor: object
    generation_config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, name: str | os.PathLike) -> HybridCheckpoint:
        from minicpm.checkpoint import resolve_model  # noqa: PLC0415

        path = resolve_model(name)
        variant, config = load_config(path)
        gen = path / "generation_config.json"
        return cls(path, variant, config, load_processor(path), json.loads(gen.read_text()) if gen.is_file() else {})

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.generation_config)

    @property
    def prompts(self) -> HybridPromptBuilder:
        return HybridPromptBuilder(self.processor)

    def load_model(self, dtype: str | torch.dtype | None = "auto") -> tuple[PreTrainedModel, object]:
        return load_model(self.path, dtype)


# ---------------------------------------------------------------------------------------------------------
# Tiny checkpoints (real layout, tiny sizes, built offline and deterministically)
# ---------------------------------------------------------------------------------------------------------

TINY_NAMES = {"tiny-minicpm-v-4.6": "minicpmv4_6", "tiny-minicpm-v-4.7": "minicpmv4_7"}
SEEDS = {"tiny-minicpm-v-4.6": 0, "tiny-minicpm-v-4.7": 0}
# The tokenizer's named multimodal tokens (the attributes the processors read). The real checkpoints' strings are
# not verified here: the code reads every id from the tokenizer and config, never from this table.
NAMED_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
                "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
                "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
EXTRA_TOKENS = ["<unk>", "<ref>", "</ref>", "<box>", "</box>", "<think>", "</think>", "<|vision_start|>",
                "<|vision_end|>"]
# ChatML with Qwen3-style thinking switch; image/video content items become the processor's placeholders.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|image_pad|>' }}"
    "{%- elif item['type'] == 'video' %}{{- '<|video_pad|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
TINY_TEXT = {"model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True},
             "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
             "linear_num_key_heads": 2, "linear_num_value_heads": 4, "attention_bias": False}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
               "image_size": 980, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
               "window_kernel_size": [2, 2]}
IMAGE_PROCESSOR = {"image_processor_type": "MiniCPMV4_6ImageProcessor", "do_convert_rgb": True, "do_normalize": True,
                   "do_rescale": True, "do_resize": True, "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.5, 0.5, 0.5], "max_slice_nums": 9, "patch_size": 14, "resample": 3,
                   "rescale_factor": 1 / 255, "scale_resolution": 448, "slice_mode": True, "use_image_id": True}
VIDEO_PROCESSOR = {**{k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"},
                   "video_processor_type": "MiniCPMV4_6VideoProcessor", "slice_mode": False, "max_num_frames": 128,
                   "stack_frames": 1, "do_sample_frames": False}


def _tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    from minicpm.tiny import CORPUS  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([*NAMED_TOKENS.values(), *EXTRA_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=dict(NAMED_TOKENS), chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(out))
    return fast


def write_checkpoint_files(variant: HybridVariant, out: Path, text: dict, vision: dict, top: dict) -> PretrainedConfig:
    """Everything of a checkpoint but its weights, with the tiny tokenizer: tokenizer files, config.json as
    transformers' config class writes it (`text` / `vision` sections and `top`-level keys as given, token ids and
    `vocab_size` when absent from the tokenizer), generation, image, video and processor configs. Returns the config."""
    tok = _tiny_tokenizer(out)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in NAMED_TOKENS.items()}
    top = {**top, "image_token_id": ids["image_token"], "video_token_id": ids["video_token"]}
    if variant.canvas_positions:
        top.update(image_start_id=ids["image_start_token"], image_end_id=ids["image_end_token"],
                   slice_start_id=ids["slice_start_token"], slice_end_id=ids["slice_end_token"],
                   newline_id=tok.convert_tokens_to_ids("\u010a"))  # byte-level "\n"
    else:
        top["drop_vision_last_layer"] = False
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    text = {"vocab_size": len(tok), **text, "eos_token_id": eos[0], "pad_token_id": eos[1], "bos_token_id": None}
    config = variant.config_class(text_config=text, vision_config=dict(vision), **top)
    config.architectures = [variant.model_class.__name__]
    config.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos[1]}, indent=2)
                                                + "\n")
    processor_class = variant.model_class.__name__.replace("ForConditionalGeneration", "Processor")
    (out / "preprocessor_config.json").write_text(
        json.dumps({**IMAGE_PROCESSOR, "processor_class": processor_class}, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(
        json.dumps({**VIDEO_PROCESSOR, "processor_class": processor_class}, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2) + "\n")
    return config


def build_tiny(name: str, out_dir: str | os.PathLike, seed: int | None = None) -> Path:
    """Write `tiny-minicpm-v-4.6` / `-4.7` into `out_dir`: config.json as transformers' config class writes it,
    model.safetensors with the real parameter names, tokenizer, processor and generation configs."""
    from minicpm.tiny import _init_weights  # noqa: PLC0415

    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(TINY_NAMES)})")
    seed = SEEDS[name] if seed is None else seed
    variant = HYBRID_MODEL_TYPES[TINY_NAMES[name]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    top = {"insert_layer_id": 1, "image_size": 448, "downsample_mode": "16x", "merge_kernel_size": [2, 2],
           "merger_times": 1, "tie_word_embeddings": False}
    config = write_checkpoint_files(variant, out, TINY_TEXT, TINY_VISION, top)
    torch.manual_seed(seed)
    model = variant.model_class(config)
    _init_weights(model, seed)
    with torch.no_grad():  # Qwen3.5's RMSNorm scales by (1 + weight): centre those weights on 0, not 1
        for module in model.modules():
            if type(module).__name__ == "Qwen3_5RMSNorm":
                module.weight.sub_(1.0)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
