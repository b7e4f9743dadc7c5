"""The hybrid LLM step (MiniCPM-V 4.6 / 4.7) with its per-layer state as model state, shared by the formats that
keep state inside the model: Core AI (states) and ExecuTorch (mutable buffers shared by the methods).

`StatefulHybridStep` wraps `minicpm.hybrid_step.HybridLanguageModelStep`. Every `StateTensor` of the step's
`StateSpec` becomes a registered buffer under its own name (`past_keys`, `past_values`, `conv_state`,
`recurrent_state`), so a converter turns each into one state / mutable buffer and the manifest's
`schedule.state` (= `StateSpec.to_dict()`) names them as they are. Inputs are the step's without the state:
inputs_embeds [1,T,H], position_ids [3,T], attention_mask [1,1,T,C+T], last_index [1], valid_tokens [1] -> logits
[1,V]. The host builds exactly the inputs it builds for the ONNX graph.

The wrapper runs the step's own `forward` on the buffers, then writes the step's state outputs back:
- KV ("append"): the buffers have S = prefill-chunk slack slots past the C context slots, [L_full, kv_heads, C+S,
  head_dim]. The step reads every slot: the host's mask [C cache columns | T new] gets S masked columns in the
  middle, so stale slack rows are never seen. After the step, its T new rows (`new_keys` / `new_values`, all layers
  at once) go to slots `start + [0, T)` with one `index_copy_` on the whole buffer. `start` (the number of cached
  tokens) is read from the mask, not from position_ids: M-RoPE positions are sequence index + a delta (4.7 images
  make it negative), so they are not slots; the host's mask lets every row see exactly the `start` cached columns
  among [0, C). Pad rows of a padded last chunk land in slots past the valid ones: masked until real tokens
  overwrite them, and the slack keeps every write in bounds (start + T <= C + S) without clamping.
- conv and recurrent ("replace"): replaced whole by `copy_` of the step's new state. The step already keeps pad
  rows out of them (`valid_tokens`: decay 0 / beta 0 rows, conv state read at the valid count).
Zeroed buffers are a new conversation (`reset`). Run eagerly the wrapper is the exact PyTorch reference of every
exported function / method (one set of buffers, as one set of state arrays at run time).

Why one write of the whole buffer after the step, measured with executorch 1.5.1 (toy of the same shape and the
tiny 4.6): a write into a layer *view* (`past_keys[i].index_copy_`, the earlier formulation) is functionalised into
a copy of the layer + `index_put` + `select_scatter`; ExecuTorch's reinplace pass then turns that `index_put` into
an in-place write on the layer copy, and memory planning ends the copy's lifetime at the write, so later small
tensors (arange / eq results) are planned over its first bytes: the first cache slots of a layer read back as
zeros (logits 5e-2 off; XNNPACK or portable kernels alike). An `index_put_` on the buffer itself is planned in the
buffers' own memory and runs in place, exactly. Core AI converts the same write into a state update. `index_put_`
with the layer as an advanced index fails in ExecuTorch at run time (error 0x12), and a slice assignment at a
traced position does not convert in coreai-torch (REFERENCE section 7).
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
        # [C cache | T new] -> [C cache | S slack, masked | T new]: the step reads whole buffers, no slice copy
        slack = torch.full((1, 1, tokens, self.slack), torch.finfo(attention_mask.dtype).min,
                           dtype=attention_mask.dtype)
        mask = torch.cat([attention_mask[..., :context], slack, attention_mask[..., context:]], dim=-1)
        state = [getattr(self, name) for name in self.state_names]
        outputs = self.step(inputs_embeds, position_ids, mask, last_index, valid_tokens, *state)
        for t, buffer, new in zip(self.spec.tensors, state, outputs[1:], strict=True):
            if t.update == "append":  # all layers' T new rows at their slots, one write of the whole buffer
                buffer.index_copy_(t.axes.index("position"), slots, new.to(t.torch_dtype))
            else:
                buffer.copy_(new.to(t.torch_dtype))
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
        "attention_mask": "[1,1,T,C+T] additive, as for ONNX; the graph masks the slack slots and writes the new "
                          "rows after the step",
        "reset": f"zeroed state = a new conversation ({backend})",
        "host": "the session keeps only the token count (masks, positions, context-full); it sends no state "
                "inputs and gets the logits only",
    }
