"""The LLM step of the hybrid models (MiniCPM-V 4.6 / 4.7, Qwen3.5 text): T new embeddings + per-layer state in,
logits + new state out. One graph serves chunked prefill (T = chunk) and decode (T = 1).

Inputs, in order (state names and shapes from `minicpm.cache.StateSpec`):
- inputs_embeds [1, T, H]
- position_ids [3, T] int64: M-RoPE rows (temporal, height, width). Text tokens carry their position on all three
  rows; 4.7's image tokens carry canvas positions that the host computes with the model's own `get_rope_index`.
- attention_mask [1, 1, T, C + T] additive, for the full-attention layers (keys: C cache slots, then the T new).
- last_index [1] int64: the row whose logits are returned.
- valid_tokens [1] int64: rows 0 .. valid_tokens-1 are real, the rest pad the last prefill chunk to a fixed T.
  Pad rows are kept out of the linear layers' state exactly: their decay is exp(0) = 1 and their write strength
  (beta) is 0, so the delta rule leaves the recurrent state unchanged; the conv state is read at the valid count
  (the last `kernel - 1` inputs ending at the last real row). Full-attention layers need nothing: pad keys come
  after every real query (causal mask) and the host writes only the valid KV rows.
- past_keys, past_values [L_full, kv_heads, C, head_dim]; conv_state [L_lin, conv_dim, kernel - 1];
  recurrent_state [L_lin, value_heads, key_dim, value_dim] float32.
Outputs: logits [1, V], new_keys, new_values [L_full, kv_heads, T, head_dim], new conv_state, new recurrent_state.

The linear layers run the gated delta rule in its chunked form (transformers' `torch_chunk_gated_delta_rule`, in
sub-chunks of 16 rows): for T = 1 it is exactly the recurrent rule (`torch_recurrent_gated_delta_rule`). The unit
lower-triangular solve of the chunk form is forward substitution written as 15 small matmuls, so the graph has no
triangular-solve op and no data-dependent Python: its loops run over static shapes (rows of a sub-chunk,
sub-chunks of the step), every state is a plain tensor in and out, and an exporter turns each into a model state
or mutable buffer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb, l2norm

from minicpm.cache import StateCache, StateSpec


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + a)^-1 for strictly lower-triangular `a` [..., b, b], by forward substitution written as b - 1 small
    matmuls (row i = e_i - a[i, :i] @ rows[:i]): no triangular-solve op, nothing data-dependent."""
    size = a.shape[-1]
    eye = torch.eye(size, dtype=a.dtype, device=a.device).expand(*a.shape[:-2], size, size)
    rows = eye[..., :1, :]
    for i in range(1, size):
        row = eye[..., i : i + 1, :] - a[..., i : i + 1, :i] @ rows
        rows = torch.cat([rows, row], dim=-2)
    return rows


def chunk_terms(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                beta: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """The within-chunk algebra of the chunked delta rule, batched over chunks of `size` rows (T padded with
    decay 0 and beta 0, which leaves the state untouched): (query, key, new_values, k_cumdecay, intra,
    chunk_decay), each with the chunk axis second ([h, chunks, ...]). What is left is the carry of the state from
    one chunk to the next (`carry_chunk`)."""
    heads, tokens = key.shape[:2]
    chunks = (tokens + size - 1) // size
    pad = chunks * size - tokens
    if not isinstance(pad, int) or pad:  # a symbolic T (ONNX) always pads; a static one only when it must
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
        decay, beta = (F.pad(x, (0, pad)) for x in (decay, beta))
    query, key, value = (x.reshape(heads, chunks, size, x.shape[-1]) for x in (query, key, value))
    decay, beta = decay.reshape(heads, chunks, size), beta.reshape(heads, chunks, size)
    lower = torch.ones(size, size, dtype=torch.bool, device=key.device).tril()
    cum = decay.cumsum(-1)
    pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(cum_i - cum_j)
    k_beta = key * beta[..., None]
    a = ((k_beta @ key.transpose(-1, -2)) * pair).masked_fill(~lower.tril(-1), 0.0)
    inverse = unit_lower_inverse(a)
    new_values = inverse @ (value * beta[..., None])
    k_cumdecay = inverse @ (k_beta * cum.exp()[..., None])
    intra = (query @ key.transpose(-1, -2)) * pair
    query = query * cum.exp()[..., None]
    last = cum[..., -1:]
    key = key * (last - cum).exp()[..., None]
    chunk_decay = last.exp()[..., None]  # [h, chunks, 1, 1]
    return query, key, new_values, k_cumdecay, intra, chunk_decay


def carry_chunk(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                intra: torch.Tensor, decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of `chunk_terms` against the state carried in: (the state carried out, the chunk's output)."""
    v_new = v - kc @ state
    return state * decay + k.transpose(-1, -2) @ v_new, q @ state + intra @ v_new


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunked form, float32 (transformers' `torch_chunk_gated_delta_rule` with chunk size
    `min(block, T)`). query/key [h, T, dk] (l2-normalised, query scaled), value [h, T, dv], decay (log space, <= 0)
    and beta [h, T], state [h, dk, dv] -> (out [h, T, dv], new state). T is padded to a multiple of the chunk with
    decay 0 and beta 0, which leaves the state untouched; for T = 1 this is exactly the recurrent rule."""
    tokens = key.shape[1]
    terms = chunk_terms(query, key, value, decay, beta, min(block, tokens))
    outs = []
    for c in range(terms[0].shape[1]):
        state, out = carry_chunk(state, *(t[:, c] for t in terms))
        outs.append(out)
    return torch.cat(outs, dim=1)[:, :tokens], state


class HybridLanguageModelStep(nn.Module):
    """One LLM call of the device schedule for a text model mixing gated delta-net and full-attention layers."""

    # The delta rule of the linear layers: an exporter whose graph has a dynamic token count swaps in an equal
    # formulation without Python loops over T (export/onnx_hybrid.py: sub-chunks through a scan).
    delta_rule = staticmethod(gated_delta_rule)

    def __init__(self, model: nn.Module, max_context: int, max_chunk: int = 128):
        super().__init__()
        text = model.model.language_model
        cfg = text.config
        self.config = cfg
        self.layers = text.layers
        self.layer_types = list(cfg.layer_types)
        self.norm = text.norm
        self.lm_head = model.lm_head
        dtype = text.embed_tokens.weight.dtype
        self.spec = StateSpec.for_text_config(cfg, max_context, dtype)
        self.max_context = max_context
        self.max_chunk = max_chunk
        self.head_dim = cfg.head_dim
        self.kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        # M-RoPE: cos/sin of every position from the model's own rotary embedding, and for each rotary slot which
        # position row (temporal / height / width) drives it (its interleaved `mrope_section` layout).
        rotary = text.rotary_emb
        positions = torch.arange(max_context)[None, None].expand(3, 1, -1)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        self.register_buffer("rope_cos", cos[0].float(), persistent=False)  # [max_context, rotary_dim]
        self.register_buffer("rope_sin", sin[0].float(), persistent=False)
        half = cos.shape[-1] // 2
        rows = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, half).clone()
        owner = rotary.recomposition_frequencies(rows)[0, 0].long()  # [rotary_dim]: 0, 1 or 2 per slot
        self.register_buffer("rope_rows", (owner[None] == torch.arange(3)[:, None]).float(), persistent=False)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, T] positions -> cos, sin [1, T, rotary_dim]."""
        rows = self.rope_rows[:, None, :]
        cos = (self.rope_cos[position_ids] * rows).sum(0)
        sin = (self.rope_sin[position_ids] * rows).sum(0)
        return cos[None].to(dtype), sin[None].to(dtype)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor, valid_tokens: torch.Tensor, *state: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        past = dict(zip(self.spec.names, state, strict=True))

        def attend_over(i: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Full-attention layer i's keys and values: its C cache slots, then the T new rows."""
            return (torch.cat([past["past_keys"][i][None].to(key.dtype), key], dim=2),
                    torch.cat([past["past_values"][i][None].to(value.dtype), value], dim=2))

        return self.run_layers(inputs_embeds, position_ids, attention_mask, last_index, valid_tokens, attend_over,
                               past.get("conv_state"), past.get("recurrent_state"))

    def run_layers(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   last_index: torch.Tensor, valid_tokens: torch.Tensor, attend_over,
                   conv_state: torch.Tensor | None, recurrent_state: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The layers over the T new tokens. `attend_over(i, key, value) -> (keys, values)` gives full-attention
        layer i ([1, kv_heads, T, head_dim] new rows in) the keys and values its queries read, whose columns
        `attention_mask` describes: `forward` concatenates its cache input; a stateful exporter writes the rows
        into its state buffer first and returns the buffer (export/stateful_hybrid.py). Returns the step's
        outputs (logits, then one update per state tensor)."""
        tokens = inputs_embeds.shape[1]
        if tokens > self.max_chunk:
            raise ValueError(f"{tokens} tokens in one step exceed max_chunk {self.max_chunk}")
        hidden = inputs_embeds
        dtype = hidden.dtype
        cos, sin = self.rotary(position_ids, dtype)
        valid = (torch.arange(tokens, device=hidden.device) < valid_tokens).to(dtype)  # [T]
        mask = attention_mask.to(dtype).repeat(1, 1, self.groups, 1)
        new_keys, new_values, new_conv, new_recurrent = [], [], [], []
        full_index = linear_index = 0
        for layer, kind in zip(self.layers, self.layer_types, strict=True):
            x = layer.input_layernorm(hidden)
            if kind == "full_attention":
                i = full_index
                full_index += 1
                out, k, v = self.attention(layer.self_attn, x, cos, sin, mask, functools.partial(attend_over, i))
                new_keys.append(k)
                new_values.append(v)
            else:
                i = linear_index
                linear_index += 1
                out, conv, recurrent = self.linear_attention(layer.linear_attn, x, valid, valid_tokens,
                                                             conv_state[i], recurrent_state[i])
                new_conv.append(conv)
                new_recurrent.append(recurrent)
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = torch.index_select(self.norm(hidden), 1, last_index)
        outputs = [self.lm_head(last)[:, 0]]
        if new_keys:
            outputs += [torch.stack(new_keys), torch.stack(new_values)]
        if new_conv:
            outputs += [torch.stack(new_conv), torch.stack(new_recurrent)]
        return tuple(outputs)

    def attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                  attend_over) -> tuple[torch.Tensor, ...]:
        """Qwen3.5 gated full attention over the keys `attend_over(key, value)` gives (the cache slots and the new
        tokens); returns the new K/V rows."""
        batch, tokens = x.shape[:2]
        query, gate = torch.chunk(attn.q_proj(x).view(batch, tokens, -1, self.head_dim * 2), 2, dim=-1)
        gate = gate.reshape(batch, tokens, -1)
        query = attn.q_norm(query).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(x).view(batch, tokens, -1, self.head_dim)).transpose(1, 2)
        value = attn.v_proj(x).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys, values = attend_over(key, value)
        # GQA without copying the cache per query head: query head h reads KV head h // groups, so the heads
        # sharing a KV head are stacked as rows [groups * T] of one product (row g * T + t).
        q = query.reshape(batch, self.kv_heads, self.groups * tokens, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = torch.matmul(probs, values).reshape(batch, -1, tokens, self.head_dim)
        out = out.transpose(1, 2).reshape(batch, tokens, -1) * torch.sigmoid(gate)
        return attn.o_proj(out), key[0], value[0]

    def linear_attention(self, la: nn.Module, x: torch.Tensor, valid: torch.Tensor, valid_tokens: torch.Tensor,
                         conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Qwen3.5 gated delta-net: causal conv over [conv state, new inputs], then the delta rule from the
        recurrent state. Returns the output and both new states (pad rows excluded, see the module doc)."""
        batch, tokens = x.shape[:2]
        mixed = la.in_proj_qkv(x).transpose(1, 2)  # [1, conv_dim, T]
        z = la.in_proj_z(x).reshape(batch, tokens, -1, la.head_v_dim)
        b = la.in_proj_b(x)
        a = la.in_proj_a(x)
        weight = la.conv1d.weight[:, 0]  # [conv_dim, kernel]
        taps = weight.shape[-1] - 1
        window = torch.cat([conv_state[None].to(mixed.dtype), mixed], dim=-1)  # [1, conv_dim, taps + T]
        # The depthwise causal conv as kernel multiply-adds (cheaper than conv1d for a few rows; any backend has it).
        conv = sum(window[..., j : j + tokens] * weight[:, j : j + 1] for j in range(taps + 1))
        if la.conv1d.bias is not None:
            conv = conv + la.conv1d.bias[:, None]
        mixed = ACT2FN[la.activation](conv).to(x.dtype).transpose(1, 2)  # [1, T, conv_dim]
        keep = torch.arange(taps, device=x.device) + valid_tokens  # the last `taps` inputs up to the last valid row
        new_conv = torch.index_select(window[0], 1, keep)
        query, key, value = torch.split(mixed, [la.key_dim, la.key_dim, la.value_dim], dim=-1)
        heads = la.num_v_heads
        repeat = heads // la.num_k_heads
        rule = torch.promote_types(x.dtype, torch.float32)  # the rule runs in float32 (float64 for a float64 model)
        query = query.reshape(tokens, -1, la.head_k_dim).to(rule)
        key = key.reshape(tokens, -1, la.head_k_dim).to(rule)
        value = value.reshape(tokens, heads, la.head_v_dim).to(rule).transpose(0, 1)
        query = l2norm(query, dim=-1, eps=1e-6) * la.head_k_dim**-0.5
        key = l2norm(key, dim=-1, eps=1e-6)
        query = query.repeat_interleave(repeat, dim=1).transpose(0, 1)  # [heads, T, dk]
        key = key.repeat_interleave(repeat, dim=1).transpose(0, 1)
        valid = valid.to(rule)[:, None]
        beta = (b[0].sigmoid().to(rule) * valid).transpose(0, 1)  # [heads, T]
        decay = (-la.A_log.to(rule).exp() * F.softplus(a[0].to(rule) + la.dt_bias) * valid).transpose(0, 1)
        out, new_state = self.delta_rule(query, key, value, decay, beta, recurrent_state.to(rule))
        out = out.transpose(0, 1).to(x.dtype)  # [T, heads, dv]
        out = la.norm(out.reshape(-1, la.head_v_dim), z.reshape(-1, la.head_v_dim)).reshape(batch, tokens, -1)
        return la.out_proj(out), new_conv, new_state


# ---------------------------------------------------------------------------------------------------------
# The device schedule on the host (reference for the runtimes): chunked prefill, then decode
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_step(step: HybridLanguageModelStep, cache: StateCache, embeds: torch.Tensor, positions: torch.Tensor,
             chunk: int | None = None) -> torch.Tensor:
    """Feed `embeds` [1, n, H] with `positions` [3, n] in steps of `chunk` rows (the last one padded to `chunk`;
    None = one step of exactly n rows) and commit the state. Returns the logits of the last real row."""
    n = embeds.shape[1]
    chunk = chunk or n
    logits = None
    for start in range(0, n, chunk):
        part = embeds[:, start : start + chunk]
        pos = positions[:, start : start + chunk]
        valid = part.shape[1]
        cache.check_room(valid)
        if valid < chunk:
            part = F.pad(part, (0, 0, 0, chunk - valid))
            pos = F.pad(pos, (0, chunk - valid))
        outputs = step(part, pos, cache.attention_mask(part.shape[1], part.dtype),
                       torch.tensor([valid - 1]), torch.tensor([valid]), *cache.inputs())
        logits = outputs[0]
        cache.commit(dict(zip(step.spec.names, outputs[1:], strict=True)), valid)
    return logits


@torch.no_grad()
def greedy_generate(step: HybridLanguageModelStep, cache: StateCache, embeds: torch.Tensor, positions: torch.Tensor,
                    rope_delta: int, embed_table: torch.Tensor, stop_ids: list[int], max_new_tokens: int,
                    chunk: int | None = None) -> list[int]:
    """Prefill the prompt (chunked), then decode greedily one token per step. A generated token at sequence index
    s takes position s + rope_delta on all three rows (4.7's canvas delta, 0 for text-only prompts and 4.6)."""
    logits = run_step(step, cache, embeds, positions, chunk)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(torch.argmax(logits[0]))
        if token in stop_ids:
            break
        tokens.append(token)
        position = torch.full((3, 1), cache.length + rope_delta, dtype=torch.long)
        logits = run_step(step, cache, embed_table[token][None, None], position)
    return tokens
