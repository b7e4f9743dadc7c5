"""The LLM's per-layer state, described as data, and the host-side cache that holds it between steps.

One place for the state kinds (as mlx-lm keeps its KV, rotating and recurrent caches in one `cache.py`):

- `kv` (full-attention layers): the rotated keys and the values of every earlier token, `[layers, kv_heads,
  max_context, head_dim]` each. The step returns the T new rows; the host writes the valid ones at the cache
  position (`update = "append"`). This is the only state that grows with the conversation: `max_context` bounds it.
- `conv` (gated delta-net layers): the last `kernel - 1` inputs of the causal depthwise convolution (the mixed
  q/k/v projections before the convolution), `[layers, conv_dim, kernel - 1]`. Fixed size; the step returns the
  whole new tensor (`update = "replace"`).
- `recurrent` (gated delta-net layers): the delta-rule memory `[layers, value_heads, key_head_dim,
  value_head_dim]`, float32 whatever the model dtype (transformers computes the rule in float32; only a float64
  model keeps it in float64). Fixed size, `update = "replace"`.

"Context" for a linear-attention layer: it has none to fill. Its conv and recurrent states summarise every token
seen so far in a fixed size, so only the full-attention KV is bounded by `max_context`. A recurrent state cannot
forget a chosen token, so the context-full policy cannot slide a window over a hybrid model as it can over a pure
KV model: when the KV is full the conversation must be restarted from a shortened history (re-prefill), and a
state is reused across turns only while the new turn fits.

`StateSpec.to_dict()` is what a manifest records; a runtime needs nothing else to allocate, zero, feed and update
the state (names, kinds, layers, shapes, dtypes, update rule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from minicpm.errors import UserError

KINDS = ("kv", "conv", "recurrent")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class StateTensor:
    """One stacked state tensor: axis 0 runs over `layers` (decoder layer indices, in that order)."""

    name: str  # the step's input name; its output name is `output`
    kind: str  # one of KINDS
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str  # "float32", "float16" or "bfloat16"
    update: str  # "append": the step returns T new rows along `axes.index("position")`; "replace": the whole tensor

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def output(self) -> str:
        """The graph output carrying this tensor's update: "past_keys" -> "new_keys" (the T new rows, named as in
        the older models' graphs, so one host rule appends them), "conv_state" -> "new_conv_state" (the whole
        replacement)."""
        return "new_" + self.name.removeprefix("past_")


@dataclass(frozen=True)
class StateSpec:
    """Every state tensor of a model's LLM step, in the step's argument order."""

    tensors: tuple[StateTensor, ...]
    max_context: int

    def __getitem__(self, name: str) -> StateTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def of_kind(self, kind: str) -> list[StateTensor]:
        return [t for t in self.tensors if t.kind == kind]

    def to_dict(self) -> dict:
        return {"max_context": self.max_context,
                "tensors": [{**asdict(t), "layers": list(t.layers), "shape": list(t.shape), "axes": list(t.axes)}
                            for t in self.tensors]}

    @classmethod
    def from_dict(cls, raw: dict) -> StateSpec:
        return cls(tuple(StateTensor(**{**t, "layers": tuple(t["layers"]), "shape": tuple(t["shape"]),
                                        "axes": tuple(t["axes"])}) for t in raw["tensors"]), int(raw["max_context"]))

    def zeros(self) -> dict[str, torch.Tensor]:
        return {t.name: torch.zeros(t.shape, dtype=t.torch_dtype) for t in self.tensors}

    @classmethod
    def for_text_config(cls, cfg, max_context: int, dtype: torch.dtype = torch.float32) -> StateSpec:
        """The state of a text model whose `layer_types` mix "full_attention" and "linear_attention" (Qwen3.5);
        a config without `layer_types` is all full attention."""
        name = {v: k for k, v in _DTYPES.items()}[dtype]
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        full = tuple(i for i, t in enumerate(types) if t == "full_attention")
        linear = tuple(i for i, t in enumerate(types) if t == "linear_attention")
        if len(full) + len(linear) != len(types):
            unknown = sorted(set(types) - {"full_attention", "linear_attention"})
            raise UserError(f"layer_types: unsupported kinds {unknown}")
        tensors = []
        if full:
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv = (len(full), cfg.num_key_value_heads, max_context, head_dim)
            axes = ("layer", "kv_head", "position", "head_dim")
            tensors += [StateTensor("past_keys", "kv", full, kv, axes, name, "append"),
                        StateTensor("past_values", "kv", full, kv, axes, name, "append")]
        if linear:
            key_dim = cfg.linear_key_head_dim * cfg.linear_num_key_heads
            conv_dim = 2 * key_dim + cfg.linear_value_head_dim * cfg.linear_num_value_heads
            tensors += [
                StateTensor("conv_state", "conv", linear, (len(linear), conv_dim, cfg.linear_conv_kernel_dim - 1),
                            ("layer", "channel", "tap"), name, "replace"),
                StateTensor("recurrent_state", "recurrent", linear,
                            (len(linear), cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                             cfg.linear_value_head_dim), ("layer", "value_head", "key_dim", "value_dim"),
                            "float64" if dtype == torch.float64 else "float32", "replace")]
        return cls(tuple(tensors), max_context)


class StateCache:
    """Host side of the schedule: the state tensors, the number of tokens they hold, and the additive mask of the
    next step. Model-agnostic: everything comes from the `StateSpec`."""

    def __init__(self, spec: StateSpec, hold: bool = True):
        """hold=False: the state lives in the backend's graph (Core AI states, ExecuTorch buffers); the cache then
        keeps only the token count, for masks, positions and the context-full check (`advance`)."""
        self.spec, self.hold = spec, hold
        self.state = spec.zeros() if hold else {}
        self.length = 0

    def reset(self) -> None:
        self.state = self.spec.zeros() if self.hold else {}
        self.length = 0

    def copy(self) -> StateCache:
        other = StateCache(self.spec, self.hold)
        other.state = {k: v.clone() for k, v in self.state.items()}
        other.length = self.length
        return other

    def inputs(self) -> list[torch.Tensor]:
        return [self.state[name] for name in self.spec.names]

    def attention_mask(self, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, 1, T, C + T] additive: each new token sees the `length` cached tokens and the new tokens up to itself
        (padding rows past the valid ones see only earlier rows, so no row is all masked)."""
        c = self.spec.max_context
        neg = torch.finfo(dtype).min
        mask = torch.full((tokens, c + tokens), neg, dtype=dtype)
        mask[:, : self.length] = 0
        mask[:, c:] = torch.triu(torch.full((tokens, tokens), neg, dtype=dtype), 1)
        return mask[None, None]

    def check_room(self, valid: int) -> None:
        if self.length + valid > self.spec.max_context:
            raise UserError(f"context full: {self.length} + {valid} tokens exceed max_context {self.spec.max_context} "
                            "(the full-attention KV); restart the conversation from a shorter history")

    def advance(self, valid: int) -> None:
        """Count `valid` tokens whose state the backend wrote itself (hold=False)."""
        self.check_room(valid)
        self.length += valid

    def commit(self, new_state: dict[str, torch.Tensor], valid: int) -> None:
        """Take a step's outputs: KV rows of the `valid` real tokens appended, conv/recurrent states replaced."""
        self.check_room(valid)
        for t in self.spec.tensors:
            new = new_state[t.name]
            if t.update == "append":
                axis = t.axes.index("position")
                index = [slice(None)] * len(t.shape)
                index[axis] = slice(self.length, self.length + valid)
                rows = [slice(None)] * new.ndim
                rows[axis] = slice(0, valid)
                self.state[t.name][tuple(index)] = new[tuple(rows)].to(t.torch_dtype)
            else:
                self.state[t.name] = new.to(t.torch_dtype)
        self.length += valid
