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
    """Greedy tokens of the eager PyTorch model behind an export (float32). Hybrid exports (MiniCPM-V 4.6 / 4.7):
    transformers' own `generate` on the prompt of the model's processor and chat template."""
    if "state" in manifest["schedule"]:
        return _hybrid_reference(reference_source(manifest), messages, sampling, enable_thinking)
    ckpt = Checkpoint.open(reference_source(manifest))
    max_slices = max_slice_nums or manifest["preprocessing"]["max_slice_nums"]
    prompt = ckpt.prompts.build(messages, max_slice_nums=max_slices, enable_thinking=enable_thinking)
    model, _ = ckpt.load_model("float32")
    return generate(model, prompt, ckpt.tokenizer, sampling, ckpt.stop_ids)


def _hybrid_reference(source: str, messages: list[dict], sampling: SamplingConfig,
                      enable_thinking: bool) -> GenerationResult:
    import torch  # noqa: PLC0415

    from minicpm.v4_6 import HybridCheckpoint  # noqa: PLC0415

    ckpt = HybridCheckpoint.open(source)
    inputs = ckpt.prompts.reference_inputs(messages, enable_thinking)  # images through the model's own processor
    model, _ = ckpt.load_model("float32")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                             eos_token_id=ckpt.stop_ids, pad_token_id=ckpt.stop_ids[0])
    tokens = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in ckpt.stop_ids]
    return GenerationResult(tokens, ckpt.tokenizer.decode(tokens), {})


def parity_line(backend: str, got: list[int], expected: list[int]) -> str:
    """'identical' or the first step where the two token streams part."""
    where = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if where is None and len(got) == len(expected):
        return f"parity: {backend} chain and eager torch reference agree on all {len(got)} greedy tokens"
    where = where if where is not None else min(len(got), len(expected))
    return (f"parity: {backend} chain and eager torch reference part at token {where} of {max(len(got), len(expected))}"
            f" (export {got[where:where + 1]}, eager {expected[where:where + 1]})")
