"""The exported chain against the eager reference of the same weights: one line a user can read.

The eager reference is `minicpm.generation.generate` on the export's source checkpoint (a `quant.awq`
directory for int4 exports, so both run the same int4 weights), with the same prompt and greedy decoding.
"""

from __future__ import annotations

from minicpm.checkpoint import Checkpoint
from minicpm.generation import GenerationResult, SamplingConfig, generate
from runtime.backends import reference_source


def eager_reference(manifest: dict, messages: list[dict], sampling: SamplingConfig, max_slice_nums: int | None,
                    enable_thinking: bool) -> GenerationResult:
    """Greedy tokens of the eager PyTorch model behind an export (float32)."""
    ckpt = Checkpoint.open(reference_source(manifest))
    max_slices = max_slice_nums or manifest["preprocessing"]["max_slice_nums"]
    prompt = ckpt.prompts.build(messages, max_slice_nums=max_slices, enable_thinking=enable_thinking)
    model, _ = ckpt.load_model("float32")
    return generate(model, prompt, ckpt.tokenizer, sampling, ckpt.stop_ids)


def parity_line(backend: str, got: list[int], expected: list[int]) -> str:
    """'identical' or the first step where the two token streams part."""
    where = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if where is None and len(got) == len(expected):
        return f"parity: {backend} chain and eager torch reference agree on all {len(got)} greedy tokens"
    where = where if where is not None else min(len(got), len(expected))
    return (f"parity: {backend} chain and eager torch reference part at token {where} of {max(len(got), len(expected))}"
            f" (export {got[where:where + 1]}, eager {expected[where:where + 1]})")
