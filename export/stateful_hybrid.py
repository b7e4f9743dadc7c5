"""The hybrid LLM step (MiniCPM-V 4.6 / 4.7) with its per-layer state as model state, shared by the formats that
keep state inside the model: Core AI (states) and ExecuTorch (mutable buffers shared by the methods).

`StatefulHybridStep` wraps `minicpm.hybrid_step.HybridLanguageModelStep`. Every `StateTensor` of the step's
`StateSpec` becomes a registered buffer under its own name (`past_keys`, `past_values`, `conv_state`,
`recurrent_state`), so a converter turns each into one state / mutable buffer and the manifest's
`schedule.state` (= `StateSpec.to_dict()`) names them as they are. Inputs are the step's without the state:
inputs_embeds [1,T,H], position_ids [3,T], attention_mask [1,1,T,C+T], last_index [1], valid_tokens [1] -> logits
[1,V]. The host builds exactly the inputs it builds for the ONNX graph.

- KV ("append"): the buffers have S = prefill-chunk slack slots past the C context slots, [L_full, kv_heads, C+S,
  head_dim]. Each full-attention layer writes its T new rows at slots `start + [0, T)` with `index_copy_` on its
  layer of the buffer, then attends over the whole buffer. `start` (the number of cached tokens) is read from the
  mask, not from position_ids: M-RoPE positions are sequence index + a delta (4.7 images make it negative), so
  they are not slots; the host's mask lets every row see exactly the `start` cached columns among [0, C). The
  mask is moved onto the buffer as the older stateful wrappers do (export/coreai.py, export/executorch_modules.py):
  columns [0, C) as given, the T new tokens' columns at their slots, the slack masked; a gather + where, which
  both converters take. Pad rows of a padded last chunk land in slots past the valid ones: masked until real
  tokens overwrite them, and the slack keeps every write in bounds (start + T <= C + S) without clamping.
- conv and recurrent ("replace"): read from the buffers, replaced whole by `copy_` of the step's new state. The
  step already keeps pad rows out of them (`valid_tokens`: decay 0 / beta 0 rows, conv state read at the valid
  count), so nothing else is needed.
Zeroed buffers are a new conversation (`reset`). Run eagerly the wrapper is the exact PyTorch reference of every
exported function / method (one set of buffers, as one set of state arrays at run time).

Writes, measured with coreai-torch 0.4.3 and executorch 1.5.1 on a toy of the same shape: `index_copy_` on a
layer view of the stacked buffer converts to a Core AI state write and runs in ExecuTorch (XNNPACK program,
shared buffers); `index_put_` with the layer as an advanced index fails in ExecuTorch at run time (error 0x12),
and a slice assignment at a traced position does not convert in coreai-torch (REFERENCE section 7).
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm.cache import StateCache
from minicpm.hybrid_step import HybridLanguageModelStep

STEP_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens"]


class StatefulHybridStep(nn.Module):
    """`HybridLanguageModelStep` with every state tensor in a registered buffer (see the module docstring)."""

    def __init__(self, step: HybridLanguageModelStep, slack: int):
        super().__init__()
        self.step = step.eval()
        self.spec, self.max_context, self.slack = step.spec, step.max_context, slack
        for t in self.spec.tensors:
            self.register_buffer(t.name, torch.zeros(self.state_shapes[t.name], dtype=t.torch_dtype),
                                 persistent=False)

    @property
    def state_names(self) -> list[str]:
        return self.spec.names

    @property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Buffer shapes: the spec's, with S slack slots on the KV position axis."""
        shapes = {}
        for t in self.spec.tensors:
            shape = list(t.shape)
            if t.update == "append":
                shape[t.axes.index("position")] += self.slack
            shapes[t.name] = tuple(shape)
        return shapes

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor, valid_tokens: torch.Tensor) -> torch.Tensor:
        tokens, context = inputs_embeds.shape[1], self.max_context
        # the cached tokens = the cache columns the first row sees (0 = visible in the host's additive mask)
        start = (attention_mask[0, 0, :1, :context] == 0).sum(-1)
        slots = start + torch.arange(tokens)
        # keys [C slots | T new] -> [C slots | S slack], the new tokens' columns at their slots
        low = torch.finfo(attention_mask.dtype).min
        base = torch.cat([attention_mask[..., :context],
                          torch.full((1, 1, tokens, self.slack), low, dtype=attention_mask.dtype)], dim=-1)
        offset = torch.arange(context + self.slack) - start
        moved = torch.index_select(attention_mask[..., context:], 3, offset.clamp(0, tokens - 1))
        mask = torch.where((offset >= 0) & (offset < tokens), moved, base)

        def attend_over(i: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.past_keys, self.past_values  # [L_full, kv_heads, C + S, head_dim]
            keys[i].index_copy_(1, slots, key[0].to(keys.dtype))  # a state write (see the module docstring)
            values[i].index_copy_(1, slots, value[0].to(values.dtype))
            return keys[i][None].to(key.dtype), values[i][None].to(value.dtype)

        outputs = self.step.run_layers(inputs_embeds, position_ids, mask, last_index, valid_tokens, attend_over,
                                       getattr(self, "conv_state", None), getattr(self, "recurrent_state", None))
        for t, new in zip(self.spec.tensors, outputs[1:], strict=True):
            if t.update == "replace":  # the KV rows ("append") are written above, layer by layer
                getattr(self, t.name).copy_(new.to(t.torch_dtype))
        return outputs[0]

    def reset(self) -> None:
        """Zero every state buffer: a fresh conversation."""
        for name in self.state_names:
            getattr(self, name).zero_()


# ---------------------------------------------------------------------------------------------------------
# Parity: the calls runtime/session.py makes, with the torch step and a host-held StateCache as reference
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def schedule_calls(step: HybridLanguageModelStep, chunk: int, dtype: torch.dtype, seed: int = 0
                   ) -> list[list[tuple[int, dict[str, torch.Tensor], torch.Tensor]]]:
    """Two conversations (each on a fresh state) as the session schedules them, as lists of (tokens per call,
    inputs, expected logits). First: a full prefill chunk, two decode steps, a padded chunk (its pad rows garbage),
    a decode step. Second: a padded chunk whose pad rows run into the slack at the end of the context (the cache
    starts there: the skipped slots are zero on both sides, which holds on a fresh state only, since pad rows leave
    values in slots past the valid ones). Expected logits: the unmodified step with the host's `StateCache` (what
    the ONNX and torch backends run). Positions differ per M-RoPE row so every rotary section is exercised."""
    gen = torch.Generator().manual_seed(seed)
    spec, hidden = step.spec, step.config.hidden_size
    context = spec.max_context
    tail = max(1, min(chunk, context - 1) - 2)
    plans = [[(chunk, chunk), (1, 1), (1, 1), (max(1, chunk - 3), chunk), (1, 1)], [(tail, chunk)]]
    conversations = []
    for plan, start in zip(plans, (0, context - tail), strict=True):
        cache, calls = StateCache(spec), []
        cache.length = start
        for valid, width in plan:
            past = cache.length
            positions = (torch.arange(past, past + width) + torch.tensor([0, 1, 2])[:, None]).clamp(max=context - 1)
            inputs = {"inputs_embeds": torch.randn(1, width, hidden, generator=gen).to(dtype),
                      "position_ids": positions, "attention_mask": cache.attention_mask(width, dtype),
                      "last_index": torch.tensor([valid - 1]), "valid_tokens": torch.tensor([valid])}
            outputs = step(*inputs.values(), *cache.inputs())
            cache.commit(dict(zip(spec.names, outputs[1:], strict=True)), valid)
            calls.append((width, inputs, outputs[0]))
        conversations.append(calls)
    return conversations


def example_inputs(step: HybridLanguageModelStep, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Trace inputs of a `tokens`-row call on an empty cache (static shapes: the values do not matter)."""
    cache = StateCache(step.spec)
    return (torch.zeros(1, tokens, step.config.hidden_size, dtype=dtype), torch.arange(tokens).repeat(3, 1),
            cache.attention_mask(tokens, dtype), torch.tensor([tokens - 1]), torch.tensor([tokens]))


def state_description(wrapper: StatefulHybridStep, backend: str) -> dict:
    """The manifest note (`schedule.<format>.state`): the backend owns the state; what it holds and how."""
    return {
        "owner": "backend",
        "tensors": {t.name: {"shape": list(wrapper.state_shapes[t.name]), "dtype": t.dtype, "update": t.update}
                    for t in wrapper.spec.tensors},
        "slack_slots": wrapper.slack,
        "write_position": "KV: the T new rows go to slots start + [0, T), start = the cache columns the first row "
                          "of the attention mask sees (the cached tokens); conv / recurrent: replaced whole",
        "attention_mask": "[1,1,T,C+T] additive, as for ONNX; the graph moves the new tokens' columns onto their "
                          "slots and masks the slack",
        "reset": f"zeroed state = a new conversation ({backend})",
        "host": "the session keeps only the token count (masks, positions, context-full); it sends no state "
                "inputs and gets the logits only",
    }
