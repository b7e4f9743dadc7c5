"""Tiny random checkpoints in the exact upstream layout, built offline and deterministically.

Each has a config.json with the real keys of its variant, a model.safetensors with the real parameter
names (including the complete audio encoder of the o-models, and a few speech-head tensors that loading
skips on purpose) and real tokenizer files: the MiniCPM-o 4.5 tokenizer for `tiny-minicpm-o-4.5`, a small
byte-level BPE with the variant's special tokens for the others. Built on first use into a cache directory, in seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from minicpm.config import MiniCPMConfig
from minicpm.modeling import MiniCPMV

BUILDER_VERSION = 3  # bump when the tiny layouts or weights change, so caches rebuild
# Weight seeds: with seed 0 the tiny V-4.5 answers every image or video with one repeated token, so greedy
# tokens could not tell a right chain from a wrong one; seed 4 gives answers that follow the input.
SEEDS = {"tiny-minicpm-v-4.5": 4}
ASSETS = Path(__file__).parent / "assets"
O45_TOKENIZER = ASSETS / "minicpm-o-4_5"

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
QWEN2_CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MULTIMODAL_TOKENS = ["<unk>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                     "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>",
                     "</unit>"]
AUDIO_TOKENS = ["<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
                "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A picture of a red square and a blue circle.",
    "What is in this image? Describe it in detail. There is a cat sitting on a wooden table.",
    "Hello! How can I help you today? The answer is forty-two. Thank you very much.",
] * 8

LONGROPE_FACTORS = [round(1.0 + 30.0 * (i / 63) ** 3, 6) for i in range(64)]  # V-4.0 shape: 64 rising factors

VISION = {"hidden_size": 64, "image_size": 980, "intermediate_size": 128, "model_type": "siglip_vision_model",
          "num_attention_heads": 2, "num_hidden_layers": 3, "patch_size": 14}
SLICE = {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": 14, "scale_resolution": 448}
MULTIMODAL = {"query_num": 64, "image_size": 448, "drop_vision_last_layer": False, "batch_vision_input": True,
              "use_image_id": True, "vision_batch_size": 16, "slice_mode": True, "patch_size": 14,
              "slice_config": SLICE, "vision_config": VISION, "torch_dtype": "float32"}
# encoder_ffn_dim = 4 x d_model, as whisper-medium: upstream sizes the projection's input as ffn // 4.
WHISPER = {"model_type": "whisper", "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
           "encoder_ffn_dim": 128, "num_mel_bins": 80, "max_source_positions": 1500, "activation_function": "gelu"}
AUDIO_PREFIXES = ("apm.", "audio_projection_layer.")


def _qwen_llm(vocab: int, qwen3: bool, hidden: int = 128) -> dict:
    cfg = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
           "max_position_embeddings": 40960 if qwen3 else 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "use_sliding_window": False, "attention_dropout": 0.0}
    if qwen3:
        cfg.update(head_dim=64, attention_bias=False)
    return cfg


def _tiny_configs() -> dict[str, dict]:
    """config.json of each tiny model: the upstream keys of its variant with small dimensions."""
    v4 = {
        "architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 4.0,
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                     "AutoModel": "modeling_minicpmv.MiniCPMV", "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        "vocab_size": None, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "longrope", "factor": 1.0, "original_max_position_embeddings": 32786,
                         "long_factor": LONGROPE_FACTORS, "short_factor": LONGROPE_FACTORS},
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2, **MULTIMODAL,
    }
    v45 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 4.5,
           "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                        "AutoModel": "modeling_minicpmv.MiniCPMV"},
           **_qwen_llm(None, qwen3=True, hidden=256), **MULTIMODAL}
    o45 = {"architectures": ["MiniCPMO"], "model_type": "minicpmo", "version": 4.5,
           "auto_map": {"AutoConfig": "configuration_minicpmo.MiniCPMOConfig",
                        "AutoModel": "modeling_minicpmo.MiniCPMO"},
           **_qwen_llm(151748, qwen3=True), "bos_token_id": 151643, "eos_token_id": 151645, **MULTIMODAL,
           "audio_config": WHISPER, "audio_pool_step": 5, "audio_chunk_length": 1.0, "stream_input": True,
           "listen_speak_type": "asr", "init_vision": True, "init_audio": True, "init_tts": True,
           "tts_config": {"model_type": "minicpmtts", "llm_dim": 128, "hidden_size": 32, "num_hidden_layers": 1}}
    o26 = {"architectures": ["MiniCPMO"], "model_type": "minicpmo", "version": 2.6,
           "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig",
                        "AutoModel": "modeling_minicpmo.MiniCPMO"},
           **_qwen_llm(None, qwen3=False), **MULTIMODAL, "audio_config": WHISPER, "audio_pool_step": 2,
           "audio_chunk_length": 1.0, "init_vision": True, "init_audio": True, "init_tts": True,
           "tts_config": {"model_type": "conditional_chattts", "llm_dim": 128, "hidden_size": 32}}
    v26 = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6,
           "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                        "AutoModel": "modeling_minicpmv.MiniCPMV"},
           **_qwen_llm(None, qwen3=False), **MULTIMODAL}
    # For benchmarks: a V-4.0-shaped model at about 1/12 of the LLM and 1/7 of the vision tower, with the real
    # vocabulary size (the head's cost is part of decode); the tiny tokenizer decodes ids it lacks to "".
    mid = {**v4, "vocab_size": 73448, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 2,
           "vision_config": {**VISION, "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6,
                             "num_hidden_layers": 6}}
    return {"tiny-minicpm-v-4": v4, "tiny-minicpm-v-4.5": v45, "tiny-minicpm-o-4.5": o45,
            "tiny-minicpm-o-2.6": o26, "tiny-minicpm-v-2.6": v26, "mid-minicpm-v-4": mid}


TINY_MODELS = list(_tiny_configs())
# MiniCPM-V 4.6 / 4.7 (transformers' own classes, opened with minicpm.v4_6.HybridCheckpoint, not Checkpoint):
# built by minicpm.v4_6.build_tiny into the same cache; `resolve_model` knows every name in ALL_TINY_MODELS.
HYBRID_TINY_MODELS = ["tiny-minicpm-v-4.6", "tiny-minicpm-v-4.7"]
ALL_TINY_MODELS = TINY_MODELS + HYBRID_TINY_MODELS


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def _bpe_tokenizer(specials_first: list[str], added: list[str], bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials_first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(added)
    if bos:  # Llama-style tokenizers prepend <s> on encode (add_bos_token)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _write_tokenizer(name: str, out: Path) -> int:
    """Write tokenizer files into `out`; return the vocabulary size the embedding needs."""
    if name == "tiny-minicpm-o-4.5":
        for f in O45_TOKENIZER.iterdir():
            shutil.copy(f, out / f.name)
        return 151748
    if name in ("tiny-minicpm-v-4", "mid-minicpm-v-4"):
        tok = _bpe_tokenizer(["<unk>", "<s>", "</s>"], ["<|im_end|>", "<|im_start|>", *MULTIMODAL_TOKENS[1:]],
                             bos="<s>")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="</s>", chat_template=CHATML)
    else:
        qwen3 = name == "tiny-minicpm-v-4.5"
        extra = ["<think>", "</think>"] if qwen3 else []
        audio = AUDIO_TOKENS if name == "tiny-minicpm-o-2.6" else []
        tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             [*MULTIMODAL_TOKENS, *extra, *audio], bos=None)
        template = json.loads((O45_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"] \
            if qwen3 else QWEN2_CHATML
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       unk_token="<unk>", chat_template=template)
    fast.save_pretrained(str(out))
    return len(fast)


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def _init_weights(model: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Deterministic random weights with O(1) activations, so greedy decoding has clear margins."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.startswith(skip):
            continue
        with torch.no_grad():
            if p.ndim == 1 and ("norm" in name or name.split(".")[-2].startswith("ln")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("lm_head.weight"):
                p.copy_(3.0 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _whisper_positions(length: int, dim: int) -> torch.Tensor:
    """Whisper's sinusoidal position table (what the real `apm.embed_positions` holds)."""
    scales = torch.exp(-math.log(10000) / (dim // 2 - 1) * torch.arange(dim // 2))
    t = torch.arange(length)[:, None] * scales[None]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _audio_and_tts_tensors(model: MiniCPMV, cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The complete apm / audio_projection_layer weights (from `model`, in the upstream layout) with their own
    generator, so the other modules keep their weights; plus a few real-named tts tensors (skipped on load)."""
    state = {}
    for name, p in sorted(model.named_parameters()):
        if not name.startswith(AUDIO_PREFIXES):
            continue
        if name == "apm.embed_positions.weight":
            value = _whisper_positions(*p.shape)
        elif p.ndim == 1 and "norm" in name:
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif p.ndim == 1:
            value = 0.02 * torch.randn(p.shape, generator=gen)
        else:  # convolutions with gain 3, so the sound outweighs the position table (else all clips look alike)
            gain = 3.0 if ".conv" in name else 1.0
            value = gain * torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
        state[name] = value.to(p.dtype).contiguous()
    h = cfg["hidden_size"]
    shapes = {"tts.projector.linear1.weight": (32, h), "tts.emb_text.weight": (64, 32),
              "tts.model.layers.0.self_attn.q_proj.weight": (32, 32)}
    state.update({k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()})
    return state


def build_tiny(name: str, out_dir: str | os.PathLike, seed: int | None = None) -> Path:
    """Write the tiny checkpoint `name` into `out_dir` (created); weights from `seed` (default: its `SEEDS`)."""
    if name in HYBRID_TINY_MODELS:
        from minicpm.v4_6 import build_tiny as build_hybrid  # noqa: PLC0415 (v4_6 imports this module lazily)

        return build_hybrid(name, out_dir, seed)
    seed = SEEDS.get(name, 0) if seed is None else seed
    configs = _tiny_configs()
    if name not in configs:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(configs)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = configs[name]
    vocab = _write_tokenizer(name, out)
    cfg["vocab_size"] = cfg.get("vocab_size") or vocab
    config = MiniCPMConfig.from_dict(cfg)
    torch.manual_seed(seed)
    model = MiniCPMV(config)
    _init_weights(model, seed, skip=AUDIO_PREFIXES)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if "audio_config" in cfg:
        state.update(_audio_and_tts_tensors(model, cfg, torch.Generator().manual_seed(seed + 1)))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if name != "tiny-minicpm-o-4.5":
        tok = PreTrainedTokenizerFast.from_pretrained(str(out))
        eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "</s>", "<|endoftext|>") if t in tok.get_vocab()]
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
        pre = json.loads((O45_TOKENIZER / "preprocessor_config.json").read_text())
        pre = {k: v for k, v in pre.items() if "audio" not in k and "feature_extractor" not in k}
        pre["version"] = cfg["version"]
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MINICPM_CACHE", Path.home() / ".cache" / "minicpm-mobile"))


def ensure_tiny(name: str) -> Path:
    """The cached tiny checkpoint `name`, built atomically on first use."""
    target = cache_dir() / "tiny" / f"{name}-v{BUILDER_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return build_into(target, lambda tmp: build_tiny(name, tmp))


def build_into(target: Path, build) -> Path:
    """Run `build(tmp)` on a temporary sibling of `target` and rename it into place when complete, so a cached
    checkpoint is whole or absent (concurrent builders: the first rename wins, the others drop theirs)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
