"""Tokenizer vectors: what transformers' tokenizer of each checkpoint encodes, decodes and streams.

Per model, `out/<model>/` holds the checkpoint's tokenizer files (as an export copies them) and `out/<model>.json`
the cases Swift's `Tokenizer` and `StreamingDecoder` must reproduce exactly:
`encode` [{"name", "text", "add_special_tokens", "ids"}], `decode` [{"name", "ids", "skip_special_tokens", "text"}],
`stream` [{"name", "ids", "pieces"}] (the pieces `TextStreamer` emits, then "<end>", then what end() flushes),
`tokens` [{"id", "token", "id_of_token"}] (id -> token string and back, for every added token and a sample of the
vocabulary) and `vocabulary_size` (`len(tokenizer)`).

Besides the checkpoints, small synthetic tokenizers cover the tokenizer.json layouts of full-size checkpoints: two
SentencePiece BPEs with byte fallback (`sentencepiece-metaspace`, `sentencepiece-legacy`: Llama family, such as
MiniCPM-V 4.0) and `qwen-split` (NFC + the Qwen2 split regex + ByteLevel, as Qwen-based checkpoints ship it).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import AddedToken
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from export.bundle import TOKENIZER_FILES
from ios_bridge.vectors.common import write_case
from minicpm.checkpoint import Checkpoint
from minicpm.generation import TextStreamer
from minicpm.tiny import CORPUS

TEXTS = {
    "empty": "",
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "ascii_symbols": "a+b=c; x<y && y>z || !done? (ok) [1] {2} ~`@#$%^&*_-|\\/",
    "cjk": "你好，世界！これは日本語です。한국어 문장도 있습니다。",
    "cjk_mixed": "MiniCPM 是一个端侧多模态大模型，支持 iPhone 和 iPad。",
    "emoji": "I ❤️ emoji 😀😃 🚀!",
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flag 🇫🇷, skin 👍🏽, rainbow 🏳️‍🌈",
    "combining": "e\u0301 vs \u00e9, n\u0303, a\u0308\u0304, Z\u0336a\u0336, \u0915\u093f\u0928\u094d\u0926\u0940",
    "whitespace": "  leading and trailing  \t\ttabs\n\nnewlines\r\n  \n   spaces   ",
    "only_spaces": "     ",
    "newlines": "\n\n\nline\n \n\t\n",
    "numbers": "3.14159 1234567890 12,345 ٣٤٥ ½ Ⅻ 2nd 007",
    "contractions": "I'm sure you're right, it's what we'd've done; they'll say I've... DON'T 'S 'Re",
    "unicode_spaces": "non\u00a0breaking\u2003em\u3000ideographic\u200bzero",
    "long_word": "supercalifragilisticexpialidocious" * 3 + "!!!!!!!!!!==========",
    "mixed_script": "Привет мир, Γειά σου, مرحبا, שלום, नमस्ते",
}


def _special_cases(tok) -> dict[str, str]:
    """Every added token alone, glued inside text and between spaces."""
    out = {}
    for i, token in enumerate(sorted(tok.get_added_vocab(), key=tok.get_added_vocab().get)):
        out[f"added_{i:03d}_alone"] = token
        out[f"added_{i:03d}_inside"] = f"x{token}y {token} z\n{token}"
    return out


# Random strings over the pre-tokenizer's edge cases: scripts, digits, every kind of space, apostrophes and
# case, punctuation runs, marks, emoji parts and fragments of special tokens.
ALPHABET = ["a", "Z", "é", "ſ", "ß", "ж", "中", "文", "ー", "한", "ا", "0", "7", "٣", "½", "Ⅻ", " ", "  ", "\t", "\n",
            "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u0085", "\u000b", "'", "'s", "'S", "'ll", "'VE", "'d",
            "!", "?!", "...", "—", "«", "»", "$", "_", "\u0301", "\u0308", "\u200d", "😀", "👍", "🏽", "\ufe0f",
            "<", "|", "<|", "im_", "end|>", "</", "s>", "<unk", ">", "\\", "\x00", "\x7f", "\ud7ff", "\U0010fffd"]


# Around the SentencePiece tokenizers' flagged added tokens.
FLAG_TEXTS = {
    "flags_single_word": "word words sword a word, word. (word)_word 2word word",
    "flags_strip": "a  [MASK]  b\t[MASK]\n[MASK][MASK]  [MASK]",
    "flags_normalized": "use <tool> here<tool>and <tool>",
}


def _random_texts(count: int, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"random_{i:02d}": "".join(rng.choice(ALPHABET, size=int(rng.integers(1, 40)))) for i in range(count)}


def _chat_prompt(ckpt: Checkpoint) -> str:
    """A full rendered chat prompt with one image's tags expanded (the text the LLM's prompt is encoded from)."""
    image = Image.fromarray(np.full((300, 500, 3), 128, np.uint8))
    prompt = ckpt.prompts.build([{"role": "user", "content": [image, "What is in this picture? 描述一下。"]}])
    return prompt.text


def _byte_ids(tok, text: str | bytes) -> list[int]:
    """One id per byte of `text` (its UTF-8 when a str): byte-level or <0xAB> fallback tokens."""
    data = text.encode() if isinstance(text, str) else text
    vocab = tok.get_vocab()
    if "<0x41>" in vocab:
        return [vocab[f"<0x{b:02X}>"] for b in data]
    byte_char = _bytes_to_unicode()
    return [vocab[byte_char[b]] for b in data]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _stream(tok, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    streamer = TextStreamer(tok, pieces.append)
    for i in ids:
        streamer.put(i)
    pieces.append("<end>")
    streamer.end()
    return pieces


def _copy_files(ckpt: Checkpoint, folder: Path) -> list[str]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            shutil.copy(ckpt.path / name, folder / name)
            copied.append(name)
    return copied


def _cases(tok, texts: dict[str, str]) -> dict:
    """Encode, decode and stream cases of `texts` plus the partial-UTF-8 and unknown-id cases."""
    encode, decode, stream = [], [], []
    for key, text in texts.items():
        for special in (False, True):
            encode.append({"name": key, "text": text, "add_special_tokens": special,
                           "ids": tok.encode(text, add_special_tokens=special)})
        ids = tok.encode(text, add_special_tokens=True)
        for skip in (True, False):
            decode.append({"name": key, "ids": ids, "skip_special_tokens": skip,
                           "text": tok.decode(ids, skip_special_tokens=skip)})
        stream.append({"name": key, "ids": ids, "pieces": _stream(tok, ids)})

    # Partial UTF-8: an emoji and a CJK character as one id per byte, cut at every position, and runs that
    # never complete; ids the tokenizer does not know.
    emoji, cjk, space = _byte_ids(tok, "😀"), _byte_ids(tok, "好"), _byte_ids(tok, " ")
    vocab = tok.get_vocab()
    special = vocab.get("<|im_end|>", tok.eos_token_id)
    partial = {
        "bytes_emoji": emoji, "bytes_cjk_then_emoji": cjk + emoji,
        "bytes_truncated": emoji[:2] + space + emoji[:3] + cjk[:1],
        "bytes_lone_continuation": emoji[1:] + space + emoji[3:] + emoji[:1] + cjk,
        "bytes_special_between": emoji[:2] + [special] + emoji[2:],
        "bytes_zwj_family": _byte_ids(tok, "👨‍👩‍👧"),
        "unknown_ids": [len(tok) + 7] + tok.encode("ok") + [len(tok) + 1000],
    }
    for key, ids in partial.items():
        for cut in range(len(ids) + 1) if key == "bytes_emoji" else [len(ids)]:
            for skip in (True, False):
                decode.append({"name": f"{key}[:{cut}]", "ids": ids[:cut], "skip_special_tokens": skip,
                               "text": tok.decode(ids[:cut], skip_special_tokens=skip)})
        stream.append({"name": key, "ids": ids, "pieces": _stream(tok, ids)})
    mixed = tok.encode("Hi 😀 there 你好", add_special_tokens=False)
    ids = mixed[:2] + emoji + [special] + cjk + mixed
    stream.append({"name": "mixed_bytes", "ids": ids, "pieces": _stream(tok, ids)})
    # A long random run of single-byte ids (mostly UTF-8 lead/continuation bytes), specials and words.
    rng = np.random.default_rng(2)
    pool = _byte_ids(tok, bytes(range(128, 256))) + _byte_ids(tok, " a") + [special] + mixed
    byte_pool = [i for i in pool if i not in mixed]
    ids = [int(rng.choice(byte_pool if rng.random() < 0.8 else pool)) for _ in range(300)]
    ids += _byte_ids(tok, "终于完整了 ✅")
    decode.append({"name": "random_bytes", "ids": ids, "skip_special_tokens": True,
                   "text": tok.decode(ids, skip_special_tokens=True)})
    stream.append({"name": "random_bytes", "ids": ids, "pieces": _stream(tok, ids)})

    sample = sorted(vocab.values())[:: max(1, len(vocab) // 200)] + list(tok.get_added_vocab().values())
    backend = tok.backend_tokenizer  # token_to_id gives None (not the unk id) for an unknown string
    tokens = [{"id": i, "token": tok.convert_ids_to_tokens(i)} for i in sorted(set(sample))]
    for t in tokens:
        t["id_of_token"] = backend.token_to_id(t["token"])
    for content in [*tok.get_added_vocab(), "<|im_end|>", "no such token", "\u2581<tool>"]:
        tokens.append({"token": content, "id_of_token": backend.token_to_id(content)})
    return {"vocabulary_size": len(tok), "encode": encode, "decode": decode, "stream": stream, "tokens": tokens}


def write_model(out: Path, name: str, prompts: list[str]) -> None:
    """A checkpoint's tokenizer files (as an export copies them) and its cases."""
    ckpt = Checkpoint.open(name)
    files = _copy_files(ckpt, out / name)
    texts = {**TEXTS, **_random_texts(60), **_special_cases(ckpt.tokenizer), "chat_prompt": _chat_prompt(ckpt)}
    texts.update({f"prompt_{i}": p for i, p in enumerate(prompts)})
    write_case(out, name, {"model": name, "directory": name, "files": files, **_cases(ckpt.tokenizer, texts)})


def _sentencepiece_tokenizer(folder: Path, legacy: bool) -> PreTrainedTokenizerFast:
    """A small SentencePiece BPE with byte fallback, converted by transformers to tokenizer.json (the Llama /
    MiniCPM4 layout: Metaspace, or for `legacy` the older Prepend + Replace normalizer with a BOS template)."""
    import sentencepiece  # noqa: PLC0415

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*CORPUS, "你好世界，这是一个测试。", "Numbers 12345.", " spaces\tand\nlines "]),
        model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    llama = LlamaTokenizerFast.from_pretrained(str(folder))
    # Added tokens with every matching flag: normalized, lstrip/rstrip, single_word, non-special.
    llama.add_tokens([AddedToken("<tool>", normalized=True, special=False),
                      AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False, special=True),
                      AddedToken("word", single_word=True, normalized=False, special=False),
                      AddedToken("<|im_end|>", normalized=False, special=True)])
    llama.save_pretrained(str(folder))
    (folder / "tokenizer.model").unlink()
    if legacy:
        path = folder / "tokenizer.json"
        doc = json.loads(path.read_text())
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        doc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
        doc["pre_tokenizer"] = None
        bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
        doc["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
        path.write_text(json.dumps(doc, ensure_ascii=False))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))  # as minicpm.prompt.load_tokenizer loads it


def _qwen_split_tokenizer(folder: Path, source: str) -> PreTrainedTokenizerFast:
    """`source`'s small byte-level BPE with the real MiniCPM-o 4.5 (Qwen2) normalizer and pre-tokenizer, as the
    tokenizer.json of a full-size Qwen-based checkpoint has them (NFC, the Qwen2 Split regex, ByteLevel)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    qwen = json.loads(Checkpoint.open("tiny-minicpm-o-4.5").tokenizer.backend_tokenizer.to_str())
    doc = json.loads((Checkpoint.open(source).path / "tokenizer.json").read_text())
    doc["normalizer"], doc["pre_tokenizer"] = qwen["normalizer"], qwen["pre_tokenizer"]
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None:
    """One folder of tokenizer files and one case file per model (images are not used by this family), plus two
    SentencePiece-style tokenizers (MiniCPM-V 4.0's real tokenizer is a Llama SentencePiece BPE)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        write_model(out, name, prompts)
    texts = {**TEXTS, **_random_texts(30, seed=1), **{f"prompt_{i}": p for i, p in enumerate(prompts)}}
    synthetic = {"sentencepiece-metaspace": lambda f: _sentencepiece_tokenizer(f, legacy=False),
                 "sentencepiece-legacy": lambda f: _sentencepiece_tokenizer(f, legacy=True),
                 "qwen-split": lambda f: _qwen_split_tokenizer(f, "tiny-minicpm-v-4.5")}
    for name, build in synthetic.items():
        tok = build(out / name)
        texts_for = {**texts, **_special_cases(tok), **FLAG_TEXTS}
        files = sorted(p.name for p in (out / name).iterdir())
        write_case(out, name, {"model": name, "directory": name, "files": files, **_cases(tok, texts_for)})
