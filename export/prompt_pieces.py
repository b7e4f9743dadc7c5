"""The chat prompt as data: the pieces of a checkpoint's own chat template, for hosts without Jinja (Swift).

`prompt_pieces(ckpt)` renders the template once with probe messages holding sentinel strings, cuts out the
text around each message (per role), before the first message and the generation prompt (with thinking on and
off), adds the image placeholder layout and the tokenizer's first-turn special ids, then rebuilds a set of probe
conversations from those pieces alone (`build_from_pieces`, the algorithm Swift's `ChatPrompt` mirrors) and
compares them with `PromptBuilder.build` / `build_turn`: text, ids and image spans must be identical, else the
template cannot be expressed as pieces and the export stops with a UserError.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from minicpm.errors import UserError
from minicpm.prompt import PromptBuilder, is_image

PIECES_VERSION = 1
SENTINEL = "\u27e6{}\u27e7"  # "⟦name⟧": text no template adds or rewrites
REASONING_PROBE = "R1</think>R2</think>\n\n A"  # Qwen3 keeps " A" of an earlier answer (last </think>, "\n" stripped)
TOOL_RESPONSE = ("<tool_response>", "</tool_response>")  # Qwen3: a user message wrapped so is not a query


def _split(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise UserError(f"the chat template does not render a message's content verbatim once ({sentinel!r})")
    before, after = text.split(sentinel)
    return before, after


def _between(text: str, first: str, second: str) -> str:
    return _split(_split(text, first)[1], second)[0]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise UserError(f"the chat template cannot be expressed as pieces: {what}")
    return text[: len(text) - len(suffix)]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise UserError(f"the chat template cannot be expressed as pieces: {what}")
    return text[len(prefix):]


def _special_ids(builder: PromptBuilder) -> tuple[list[int], list[int]]:
    """The ids encode(add_special_tokens=True) adds before and after the text (e.g. Llama's <s>)."""
    tok = builder.tokenizer
    found = set()
    for probe in ("<|im_start|>user\nhi<|im_end|>\n", "a b c"):
        plain, full = tok.encode(probe, add_special_tokens=False), tok.encode(probe, add_special_tokens=True)
        starts = [k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain]
        if not starts:
            raise UserError("the tokenizer's special tokens are not a fixed prefix and suffix of the text's ids")
        found.add((tuple(full[: starts[0]]), tuple(full[starts[0] + len(plain):])))
    if len(found) != 1:
        raise UserError("the tokenizer adds different special tokens to different texts")
    bos, eos = found.pop()
    return list(bos), list(eos)


def derive_pieces(builder: PromptBuilder) -> dict:
    """Cut the template's renderings of sentinel probes into pieces (unverified: see prompt_pieces)."""
    s = {k: SENTINEL.format(k) for k in ("S", "S2", "U", "U2", "A")}

    def render(chat: list[tuple[str, str]], generation: bool = False, thinking: bool = False) -> str:
        return builder._template([{"role": r, "content": c} for r, c in chat], thinking, generation)

    user_only = render([("user", s["U"])])
    before_u, user_footer = _split(user_only, s["U"])
    user_header = _strip_prefix(_between(render([("user", s["U"]), ("user", s["U2"])]), s["U"], s["U2"]),
                                user_footer, "two user messages are not footer + header apart")
    no_system = _strip_suffix(before_u, user_header, "the first user message has a different header")
    with_system = render([("system", s["S"]), ("user", s["U"])])
    system_footer = _strip_suffix(_between(with_system, s["S"], s["U"]), user_header,
                                  "a user message after a system message has a different header")
    system_header = _strip_prefix(_between(render([("system", s["S"]), ("system", s["S2"]), ("user", s["U"])]),
                                           s["S"], s["S2"]), system_footer, "a second system message differs")
    prefix = _strip_suffix(_split(with_system, s["S"])[0], system_header, "the first system message differs")
    history = [("user", s["U"]), ("assistant", s["A"]), ("user", s["U2"])]
    assistant_header = _strip_prefix(_between(render(history), s["U"], s["A"]), user_footer,
                                      "an assistant message does not follow a user message's footer")
    assistant_footer = _strip_suffix(_between(render(history), s["A"], s["U2"]), user_header,
                                     "a user message after an assistant message has a different header")
    probe = [("user", s["U"])]
    generation = {name: _strip_prefix(render(probe, True, on), render(probe), "the generation prompt is not appended")
                  for name, on in (("thinking", True), ("no_thinking", False))}
    bos, eos = _special_ids(builder)
    sp = builder.special
    pieces = {
        "version": PIECES_VERSION,
        "prefix": prefix,
        "default_system": _strip_prefix(no_system, prefix, "the text before a first user message"),
        "roles": {"system": {"header": system_header, "footer": system_footer},
                  "user": {"header": user_header, "footer": user_footer},
                  "assistant": {"header": assistant_header, "footer": assistant_footer}},
        "generation": generation,
        "thinking": bool(builder.config.variant.thinking),
        "history_reasoning": None,
        "non_query_user": None,
        "trailing_assistant": True,
        "continuation": assistant_footer,
        "content_joiner": "\n",
        "image_tag": builder.tag,
        "placeholder": {"image_start": sp.im_start, "image_end": sp.im_end, "unk": sp.unk,
                        "query_num": builder.config.query_num, "slice_start": sp.slice_start,
                        "slice_end": sp.slice_end, "slice_row_joiner": "\n",
                        "use_image_id": bool(builder.config.use_image_id), "id_start": sp.im_id_start,
                        "id_end": sp.im_id_end, "video_image_id": False},
        "bos_ids": bos,
        "eos_ids": eos,
        "dropped_ids": sorted(builder.dropped_ids),
        "span_start_ids": sorted(builder.start_ids),
        "span_end_ids": sorted(builder.end_ids),
    }
    # How earlier answers are rewritten: verbatim, or their reasoning cut off (Qwen3).
    kept = _between(render([("user", s["U"]), ("assistant", REASONING_PROBE), ("user", s["U2"])]),
                    s["U"] + user_footer + assistant_header, assistant_footer + user_header + s["U2"])
    if kept != REASONING_PROBE:
        if kept != _strip_reasoning(REASONING_PROBE, "</think>"):
            raise UserError(f"the chat template rewrites an earlier answer in an unknown way ({kept!r})")
        pieces["history_reasoning"] = {"close": "</think>"}
    # Answers after the last query: rendered like earlier ones, or differently (Qwen3: a think block).
    wrapped = TOOL_RESPONSE[0] + s["U2"] + TOOL_RESPONSE[1]
    tool_chat = [("user", s["U"]), ("assistant", REASONING_PROBE), ("user", wrapped)]
    if render(tool_chat, True) != _render(pieces, tool_chat, False):
        pieces["non_query_user"] = {"prefix": TOOL_RESPONSE[0], "suffix": TOOL_RESPONSE[1]}
    trailing = [[("user", s["U"]), ("assistant", s["A"])], [("user", s["U"]), ("assistant", REASONING_PROBE)],
                [("user", s["U"]), ("assistant", REASONING_PROBE), ("system", s["S"])]]
    pieces["trailing_assistant"] = all(render(chat, True, on) == _render(pieces, chat, on)
                                       for chat in trailing for on in (False, True))
    return pieces


def _strip_reasoning(content: str, close: str) -> str:
    return content.split(close)[-1].lstrip("\n")


def _last_query(pieces: dict, chat: list[tuple[str, str]]) -> int:
    wrap = pieces["non_query_user"]
    for i in range(len(chat) - 1, -1, -1):
        role, content = chat[i]
        if role == "user" and not (wrap and content.startswith(wrap["prefix"]) and content.endswith(wrap["suffix"])):
            return i
    return len(chat) - 1


def _render(pieces: dict, chat: list[tuple[str, str]], enable_thinking: bool) -> str:
    """A whole conversation (the template's part) from the pieces: what `PromptBuilder.render` gives."""
    if not chat:
        raise UserError("no messages")
    text = pieces["prefix"] + (pieces["default_system"] if chat[0][0] != "system" else "")
    last_query, reasoning = _last_query(pieces, chat), pieces["history_reasoning"]
    for i, (role, content) in enumerate(chat):
        if role == "assistant":
            if i > last_query and not pieces["trailing_assistant"]:
                raise UserError("this chat template renders an assistant message after the last user message "
                                "differently; such a conversation cannot be built from the prompt pieces")
            if reasoning and reasoning["close"] in content:
                content = _strip_reasoning(content, reasoning["close"])
        text += pieces["roles"][role]["header"] + content + pieces["roles"][role]["footer"]
    return text + pieces["generation"]["thinking" if enable_thinking else "no_thinking"]


def _render_turn(pieces: dict, chat: list[tuple[str, str]], enable_thinking: bool) -> str:
    """A follow-up turn: close the previous answer, the new messages as they are, the generation prompt."""
    body = "".join(pieces["roles"][r]["header"] + c + pieces["roles"][r]["footer"] for r, c in chat)
    return pieces["continuation"] + body + pieces["generation"]["thinking" if enable_thinking else "no_thinking"]


def _message_texts(pieces: dict, messages: list[dict]) -> tuple[list[tuple[str, str]], list]:
    """Described messages -> (role, text with image tags) and one entry per tag: a grid, None or "video"."""
    chat, images = [], []
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"unknown message role {m['role']!r}")
        parts = []
        for item in m["content"]:
            if item["type"] == "text":
                parts.append(item["text"])
                continue
            images.append("video" if item["type"] == "video_group" else item["grid"])
            parts.append(pieces["image_tag"])
        chat.append((m["role"], pieces["content_joiner"].join(parts)))
    return chat, images


def _placeholder(pieces: dict, image, index: int) -> str:
    p = pieces["placeholder"]
    text = p["image_start"] + p["unk"] * p["query_num"] + p["image_end"]
    video = image == "video"
    if p["use_image_id"] and (not video or p["video_image_id"]):
        text = f"{p['id_start']}{index}{p['id_end']}" + text
    if image is not None and not video:
        cols, rows = image
        cell = p["slice_start"] + p["unk"] * p["query_num"] + p["slice_end"]
        text += p["slice_row_joiner"].join(cell * cols for _ in range(rows))
    return text


def image_bounds(pieces: dict, ids: list[int]) -> list[tuple[int, int]]:
    starts = [i + 1 for i, t in enumerate(ids) if t in pieces["span_start_ids"]]
    ends = [i for i, t in enumerate(ids) if t in pieces["span_end_ids"]]
    if len(starts) != len(ends) or any(e < s for s, e in zip(starts, ends, strict=True)):
        raise UserError("unbalanced image placeholder tokens in the prompt")
    return list(zip(starts, ends, strict=True))


def build_from_pieces(pieces: dict, encode: Callable[[str], list[int]], messages: list[dict],
                      enable_thinking: bool = False, first_image: int = 0, continuation: bool = False
                      ) -> tuple[list[int], list[tuple[int, int]], str]:
    """(input ids, image spans, text) of described messages from the pieces alone, as Swift's ChatPrompt builds
    them. `encode` is the tokenizer's encode without special tokens. Items: {"type": "text", "text"},
    {"type": "image", "grid": [cols, rows] | None}, {"type": "video_group"}."""
    chat, images = _message_texts(pieces, messages)
    text = (_render_turn if continuation else _render)(pieces, chat, enable_thinking)
    chunks = text.split(pieces["image_tag"])
    if len(chunks) - 1 != len(images):
        raise UserError(f"the text contains the reserved image tag {pieces['image_tag']!r}")
    final = chunks[0] + "".join(_placeholder(pieces, im, first_image + i) + chunks[i + 1]
                                for i, im in enumerate(images))
    ids = encode(final) if continuation else pieces["bos_ids"] + encode(final) + pieces["eos_ids"]
    ids = [t for t in ids if t not in pieces["dropped_ids"]]
    return ids, image_bounds(pieces, ids), final


def describe(messages: list[dict], images: list) -> list[dict]:
    """Real messages (PIL images, arrays, video items) -> described ones, the grids read from the built prompt's
    `images` (ImageInputs, in order)."""
    queue, out = list(images), []
    for m in messages:
        content = m.get("content")
        items = [content] if isinstance(content, str) or is_image(content) else list(content or [])
        described = []
        for item in items:
            if is_image(item):
                grid = queue.pop(0).sliced.grid
                described.append({"type": "image", "grid": list(grid) if grid is not None else None})
            elif isinstance(item, dict) and item.get("type") == "video":
                for _ in item.get("temporal_ids") or []:
                    described.append({"type": "video_group", "frames": len(queue.pop(0).pixel_values)})
            else:
                described.append({"type": "text", "text": item["text"] if isinstance(item, dict) else item})
        out.append({"role": m["role"], "content": described})
    return out


def _probe_images() -> dict:
    def im(w, h):
        return np.full((h, w, 3), 127, dtype=np.uint8)

    return {"small": im(200, 150), "wide": im(640, 480), "tall": im(300, 900)}


def probe_conversations(builder: PromptBuilder) -> list[tuple[str, list[dict], int | None]]:
    """(name, messages, first_image or None for a first turn) covering what the pieces must reproduce."""
    i = _probe_images()
    convs = [
        ("text", [{"role": "user", "content": "What is this?"}], None),
        ("system", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": [i["small"], "Hi"]}], None),
        ("two_images", [{"role": "user", "content": [i["wide"], i["tall"], "Compare them."]}], None),
        ("history", [{"role": "user", "content": [i["small"], "a"]}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}], None),
        ("reasoning", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x</think>\n\ny"},
                       {"role": "user", "content": [i["wide"], "c"]}], None),
        ("assistant_first", [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "a"}], None),
        ("late_system", [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                         {"role": "system", "content": "t"}, {"role": "user", "content": ["", "b"]}], None),
        ("turn", [{"role": "user", "content": [i["tall"], "And this one?"]}], 1),
        ("turn_text", [{"role": "system", "content": "s"}, {"role": "user", "content": "more"}], 3),
    ]
    if builder.config.variant.resampler == "3d":
        frames = [np.full((64, 96, 3), v, dtype=np.uint8) for v in (10, 90, 200)]
        video = {"type": "video", "frames": frames, "temporal_ids": [[0, 3], [7]]}
        convs += [("video", [{"role": "user", "content": [video, "What happens?"]}], None),
                  ("video_turn", [{"role": "user", "content": [i["small"], video, "Then?"]}], 2)]
    return convs


def verify_pieces(pieces: dict, builder: PromptBuilder) -> None:
    """Rebuild every probe conversation from the pieces; any difference from PromptBuilder is a UserError."""
    encode = lambda text: builder.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    gen = pieces["generation"]
    for name, messages, first in probe_conversations(builder):
        for thinking in (False, True) if gen["thinking"] != gen["no_thinking"] else (False,):
            if first is None:
                expected = builder.build(messages, enable_thinking=thinking)
            else:
                expected = builder.build_turn(messages, first, enable_thinking=thinking)
            got = build_from_pieces(pieces, encode, describe(messages, expected.images), thinking, first or 0,
                                    first is not None)
            if got != (expected.input_ids, expected.image_bounds, expected.text):
                raise UserError(f"the chat template cannot be expressed as pieces: the probe {name!r} "
                                f"(thinking {thinking}) builds differently from them")


def prompt_pieces(ckpt) -> dict:
    """The manifest's "prompt" section for `ckpt` (a Checkpoint): template pieces, placeholder layout and
    special ids, verified against the checkpoint's PromptBuilder."""
    pieces = derive_pieces(ckpt.prompts)
    verify_pieces(pieces, ckpt.prompts)
    return pieces
