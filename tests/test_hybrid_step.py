"""The hybrid LLM step: per-layer state as data, chunked prefill = one-token recurrence, padded chunks leave the
linear layers' state alone, and a state carried across turns equals recomputing the conversation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minicpm.cache import StateCache, StateSpec
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep, greedy_generate, run_step
from minicpm.v4_6 import HybridCheckpoint, prompt_embeddings, prompt_inputs, prompt_positions

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def v47():
    ckpt = HybridCheckpoint.open("tiny-minicpm-v-4.7")
    model = ckpt.load_model("float32")[0]
    image = Image.fromarray((np.random.RandomState(1).rand(300, 500, 3) * 255).astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    inputs = prompt_inputs(ckpt.processor, messages, images=[image])
    step = HybridLanguageModelStep(model, max_context=192, max_chunk=128)
    return ckpt, model, inputs, step


def _prefill(step, embeds, positions, chunk):
    cache = StateCache(step.spec)
    logits = run_step(step, cache, embeds, positions, chunk)
    return logits, cache


def test_state_is_described_as_data(v47):
    ckpt, model, _, step = v47
    cfg = model.config.text_config
    spec = step.spec
    full = tuple(i for i, t in enumerate(cfg.layer_types) if t == "full_attention")
    linear = tuple(i for i, t in enumerate(cfg.layer_types) if t == "linear_attention")
    assert full and linear
    assert spec.names == ["past_keys", "past_values", "conv_state", "recurrent_state"]
    assert [t.kind for t in spec.tensors] == ["kv", "kv", "conv", "recurrent"]
    assert spec["past_keys"].layers == full and spec["recurrent_state"].layers == linear
    assert spec["past_keys"].shape == (len(full), cfg.num_key_value_heads, 192, cfg.head_dim)
    conv_dim = (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
                + cfg.linear_num_value_heads * cfg.linear_value_head_dim)
    assert spec["conv_state"].shape == (len(linear), conv_dim, cfg.linear_conv_kernel_dim - 1)
    assert spec["recurrent_state"].shape == (len(linear), cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                             cfg.linear_value_head_dim)
    assert spec["recurrent_state"].dtype == "float32" and spec["past_keys"].update == "append"
    assert StateSpec.from_dict(spec.to_dict()) == spec


def test_state_matches_transformers_cache(v47):
    """Our conv / recurrent states are transformers' cache contents (its conv state keeps one more, unused tap)."""
    _, model, inputs, step = v47
    embeds, (positions, _) = prompt_embeddings(model, inputs), prompt_positions(model, inputs)
    logits, cache = _prefill(step, embeds, positions, 128)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    torch.testing.assert_close(logits[0], out.logits[0, -1], **TOL)
    linear = step.spec["conv_state"].layers
    for row, layer in enumerate(linear):
        torch.testing.assert_close(cache.state["conv_state"][row], out.cache.layers[layer].conv_states[0][0, :, 1:],
                                   **TOL)
        torch.testing.assert_close(cache.state["recurrent_state"][row], out.cache.layers[layer].recurrent_states[0][0],
                                   **TOL)


@pytest.mark.parametrize("chunk", [7, 128])
def test_chunked_prefill_equals_recurrence(v47, chunk):
    _, model, inputs, step = v47
    embeds, (positions, _) = prompt_embeddings(model, inputs), prompt_positions(model, inputs)
    n = embeds.shape[1]
    assert n % chunk != 0  # the last chunk is padded
    one_logits, one = _prefill(step, embeds, positions, 1)  # decode path: T = 1, the recurrent rule
    logits, chunked = _prefill(step, embeds, positions, chunk)
    torch.testing.assert_close(logits, one_logits, **TOL)
    assert chunked.length == one.length == n
    for name in step.spec.names:
        torch.testing.assert_close(chunked.state[name], one.state[name], **TOL, msg=name)


def test_padding_rows_never_reach_the_state(v47):
    _, model, inputs, step = v47
    embeds, (positions, _) = prompt_embeddings(model, inputs), prompt_positions(model, inputs)
    part, pos = embeds[:, :10], positions[:, :10]
    padded = torch.cat([part, 5 * torch.randn(1, 6, part.shape[2])], dim=1)  # garbage, not zeros
    pad_pos = torch.cat([pos, torch.full((3, 6), 7)], dim=1)
    clean, noisy = StateCache(step.spec), StateCache(step.spec)
    with torch.no_grad():
        a = step(part, pos, clean.attention_mask(10), torch.tensor([9]), torch.tensor([10]), *clean.inputs())
        b = step(padded, pad_pos, noisy.attention_mask(16), torch.tensor([9]), torch.tensor([10]), *noisy.inputs())
    torch.testing.assert_close(a[0], b[0], **TOL)
    for name, x, y in zip(step.spec.names, a[1:], b[1:], strict=True):
        x, y = (x[:, :, :10], y[:, :, :10]) if step.spec[name].update == "append" else (x, y)
        torch.testing.assert_close(x, y, **TOL, msg=name)


def test_state_carried_across_turns_equals_recompute(v47):
    ckpt, model, inputs, step = v47
    tok = ckpt.tokenizer
    embeds = prompt_embeddings(model, inputs)
    positions, delta = prompt_positions(model, inputs)
    table = model.get_input_embeddings().weight.detach()
    carried = StateCache(step.spec)
    answer = greedy_generate(step, carried, embeds, positions, delta, table, ckpt.stop_ids, 4, chunk=16)
    assert len(answer) == 4 and carried.length == embeds.shape[1] + 4
    turn2 = tok("<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n",
                add_special_tokens=False)["input_ids"]
    start = carried.length
    turn2_positions = (torch.arange(start, start + len(turn2)) + delta).expand(3, -1)
    logits = run_step(step, carried, table[turn2][None], turn2_positions, chunk=16)
    # The whole conversation from scratch: same ids, same vision features, positions from the model's own code.
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer + turn2])], dim=1)
    whole = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                 mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer + turn2),
                                                                                       dtype=torch.long)], dim=1))
    all_positions, _ = prompt_positions(model, whole)
    torch.testing.assert_close(all_positions[:, start:], turn2_positions)
    fresh = StateCache(step.spec)
    again = run_step(step, fresh, prompt_embeddings(model, whole), all_positions, chunk=128)
    torch.testing.assert_close(logits, again, **TOL)
    assert fresh.length == carried.length
    for name in step.spec.names:
        torch.testing.assert_close(carried.state[name], fresh.state[name], **TOL, msg=name)


def test_context_full_is_one_line(v47):
    _, model, inputs, step = v47
    cache = StateCache(step.spec)
    cache.length = step.spec.max_context - 2
    with pytest.raises(UserError, match=r"^context full: 190 \+ 3 tokens exceed max_context 192"):
        run_step(step, cache, torch.zeros(1, 3, model.config.text_config.hidden_size), torch.zeros(3, 3,
                                                                                                  dtype=torch.long))
