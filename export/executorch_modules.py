"""The torch modules behind `model.pte`'s methods (export.executorch): the stateful decoder over the KV cache in
mutable buffers, the vision/video steps with a split-projection resampler, the stateful audio encoder and the
token-embedding lookup, plus the host-side input helpers the parity checks and the backend share.

Each module is written for what ExecuTorch 1.5.1's XNNPACK and portable kernels run well (see the workarounds
listed in export/executorch.py's docstring): keys stored transposed and query heads stacked instead of a GQA
repeat, `index_put_` on buffers only, a gather for the mask, the resampler's in-projection split into three
Linears, inputs copied so no axis has stride 0.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from minicpm.modeling import MiniCPMV
from minicpm.split import AudioChunkStep, LanguageModelStep, VideoGroupStep, VisionStep
from runtime.session import NEG_INF

# The program's methods, in summary order, and the inputs of each (names as in the manifest)
METHODS = ["vision_encoder", "video_encoder", "audio_encoder", "token_embedding", "text_decoder", "prefill"]
VISION_INPUTS = ["pixel_values", "position_ids", "patch_mask", "pos_embed"]
AUDIO_INPUTS = ["mel", "conv_mask", "position_ids", "attention_mask"]  # AudioChunkStep's, minus the past K/V
DECODER_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index"]
PARITY_KEYS = {"audio_encoder": "audio"}  # manifest parity key of a method, where it is not the method's name


class StatefulDecoder(nn.Module):
    """`text_decoder`: `LanguageModelStep` with its KV cache in mutable buffers (layout in the module docstring).

    inputs_embeds [1,T,H], position_ids [1,T] int64, attention_mask [1,1,T,C+T] additive, last_index [1] int64
    -> logits [1,V]; the T new K/V are written to slots position_ids[0,0] + [0, T).

    The layers are `LanguageModelStep.run_layers` with its attention rearranged for a cache that stays put:
    keys are stored transposed ([1, kv, head_dim, C+S], ready for q @ K) and the query heads sharing a KV head
    are stacked into one matrix product, so no call copies the cache. run_layers' repeat_interleave and the
    transpose for q @ K^T each copy the whole cache per layer in portable kernels, which held the mid-size
    model to ~6 tok/s whatever the weights. Parity with LanguageModelStep is checked by `decoder_parity`.
    """

    def __init__(self, model: MiniCPMV, max_context: int, max_tokens: int):
        super().__init__()
        self.step = LanguageModelStep(model, max_context)
        self.max_context, self.slack = max_context, max_tokens
        self.layers = len(self.step.layers)
        kv, slots, head_dim = self.step.kv_heads, max_context + max_tokens, self.step.head_dim
        for i in range(self.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, kv, head_dim, slots, dtype=model.dtype),
                                 persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, kv, slots, head_dim, dtype=model.dtype),
                                 persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor) -> torch.Tensor:
        step = self.step
        tokens = inputs_embeds.shape[1]
        start = position_ids[0, :1]
        slots = start + torch.arange(tokens)
        # The host's keys are [C cache slots | T new tokens]; the buffer's are [C slots | S slack] with the new
        # tokens written at their slots, so their mask columns move there: a gather + where, cheap at [T, C + S].
        # (Not an index_put: ExecuTorch's re-inplace pass turns that one into wrong logits, measured.)
        base = torch.cat([attention_mask[..., : self.max_context],
                          torch.full((1, 1, tokens, self.slack), float(NEG_INF), dtype=attention_mask.dtype)], dim=-1)
        offset = torch.arange(self.max_context + self.slack) - start
        new = (offset >= 0) & (offset < tokens)
        moved = torch.index_select(attention_mask[..., self.max_context:], 3, offset.clamp(0, tokens - 1))
        mask = torch.where(new, moved, base)[:, :, None]  # [1, 1, 1, T, C+S]: broadcast over kv heads, groups

        hidden = inputs_embeds
        dtype = hidden.dtype
        cos, sin = step.rope_cos[position_ids].to(dtype), step.rope_sin[position_ids].to(dtype)
        kv, groups, head_dim = step.kv_heads, step.groups, step.head_dim
        for i, layer in enumerate(step.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, tokens, -1, head_dim)
            k = attn.k_proj(x).view(1, tokens, -1, head_dim)
            v = attn.v_proj(x).view(1, tokens, -1, head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            # rotated in [1, T, heads, head_dim]: run_layers' transposed form leaves symbolic strides that
            # torch.export cannot prove viewable for every T (it would pin T to the example's length)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            keys, values = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            # index_put_ spelled out: `values[:, :, slots] = v` drops v's leading unit axis, which ExecuTorch's
            # in-place index_put kernel (the re-inplaced cache write) rejects.
            torch.ops.aten.index_put_(keys, [None, None, None, slots], k.permute(0, 2, 3, 1).to(keys.dtype))
            torch.ops.aten.index_put_(values, [None, None, slots], v.to(values.dtype))
            # query head h reads KV head h // groups (run_layers' repeat_interleave): its rows [groups * T]
            q = q.view(1, tokens, kv, groups, head_dim).permute(0, 2, 3, 1, 4).reshape(kv, groups * tokens, head_dim)
            scores = torch.bmm(q, keys[0]) * step.scaling
            scores = scores.view(1, kv, groups, tokens, -1) + mask
            probs = torch.softmax(scores.float(), dim=-1).to(dtype).view(kv, groups * tokens, -1)
            out = torch.bmm(probs, values[0])  # [kv, groups * T, head_dim]
            # back to [T, heads * head_dim] with slices, not a view: torch.export cannot prove the split of the
            # symbolic [groups * T] axis viewable for every T and would pin T to the example's length
            out = torch.stack([out[:, g * tokens:(g + 1) * tokens] for g in range(groups)], dim=1)
            hidden = hidden + attn.o_proj(out.permute(2, 0, 1, 3).reshape(1, tokens, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = torch.index_select(step.norm(hidden), 1, last_index)
        return step.lm_head(last)[:, 0]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as matmuls and a softmax. scaled_dot_product_attention decomposes with a
    guard for fully masked rows (eq, any, logical_not, where: portable ops, each cutting the XNNPACK partition) that
    no row here needs: every query sees at least one key."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores if mask is None else scores + mask, dim=-1), v)


class SplitProjectionAttention(nn.Module):
    """The resampler's `nn.MultiheadAttention` (sequence-first, no dropout, no weights returned) with its packed
    [3E, E] in-projection held as three Linears. Packed, the projection weights are slices taken inside the
    graph: not constants, so XNNPACK leaves those three products to portable kernels, which took most of the
    mid-size vision step (18 s per slice). Same arithmetic as `F.multi_head_attention_forward`."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.batch_first or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ValueError("SplitProjectionAttention covers the resampler's MultiheadAttention layout only")
        e = mha.embed_dim
        self.num_heads = mha.num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False) -> tuple[torch.Tensor, None]:
        (lq, batch, e), lk = query.shape, key.shape[0]
        heads = self.num_heads

        def split(x: torch.Tensor, length: int) -> torch.Tensor:  # [L, B, E] -> [B, heads, L, E/heads]
            return x.view(length, batch, heads, e // heads).permute(1, 2, 0, 3)

        q, k, v = split(self.q_proj(query), lq), split(self.k_proj(key), lk), split(self.v_proj(value), lk)
        mask = None
        if key_padding_mask is not None:  # True = padding, as nn.MultiheadAttention takes it
            mask = torch.zeros(batch, 1, 1, lk, dtype=q.dtype).masked_fill(key_padding_mask[:, None, None, :],
                                                                         float("-inf"))
        out = explicit_attention(q, k, v, mask)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(lq * batch, e))
        return out.view(lq, batch, e), None


def split_resampler(model: MiniCPMV) -> nn.Module:
    """A copy of the resampler whose attention has split projections (`SplitProjectionAttention`), sharing
    every parameter; the model itself is left as it is."""
    resampler = copy.copy(model.resampler)  # shares every parameter ...
    resampler._modules = dict(model.resampler._modules)  # ... but not the table of submodules
    resampler.attn = SplitProjectionAttention(model.resampler.attn)
    return resampler


def vision_step(model: MiniCPMV) -> VisionStep:
    """`VisionStep` for export: the same modules with the split-projection resampler."""
    step = VisionStep(model).eval()
    step.resampler = split_resampler(model)
    return step


def video_step(model: MiniCPMV) -> VideoGroupStep:
    """`video_encoder`: one frame group of 6 slots (MiniCPM-V 4.5's 3D resampler) per call, batch 1 as for
    slices; the same split-projection resampler."""
    return VideoGroupStep(model, split_resampler(model)).eval()


class StatefulAudioEncoder(nn.Module):
    """`audio_encoder`: `AudioChunkStep` with the clip's encoder cache in mutable buffers, keys stored transposed
    as the LLM's: `audio_k_cache_{i}` [heads, head_dim, P], `audio_v_cache_{i}` [heads, P, head_dim] (P = the
    encoder's 1500 positions).

    mel [1, n_mels, 2C+3], conv_mask [1, 2C+1], position_ids [C] int64, attention_mask [1, 1, C, P+C] (the
    host's mask: P cache slots, then the C new frames) -> tokens [C / pool, H]. The chunk's K/V are written to
    slots position_ids[0] + [0, C) (position_ids[0] = frames already cached, and position_ids[0] + C <= P, so
    no slack) and the mask's new-frame columns move there, as `StatefulDecoder` does.

    Stateful, as the LLM, rather than host-held: a host-held cache goes in whole on every call (2 x 147 MB per
    1 s chunk for Whisper-medium) and is concatenated per layer. Stale slots of an earlier clip are masked (exact
    zero weights), so a new clip needs no reset. The names differ from the LLM's `k_cache_{i}`: shared mutable
    buffers are matched by name across methods and each name gets its own memory, so audio and LLM calls
    (interleaved by live audio) never touch each other's cache.

    The layers are `AudioChunkStep.run_layers`' arithmetic with 3D products on the buffers: its 4D matmuls
    reach XNNPACK as expand copies of the whole cache per layer in portable kernels. Measured at Whisper-medium
    width with 4 layers on 2 cores, ms per chunk: host-held cache 127, buffers through run_layers 146, this 78.
    Parity with AudioChunkStep is checked by `audio_parity`."""

    def __init__(self, model: MiniCPMV):
        super().__init__()
        self.step = AudioChunkStep(model)
        self.positions = model.apm.max_source_positions
        heads, head_dim = self.step.heads, self.step.head_dim
        for i in range(len(model.apm.layers)):
            self.register_buffer(f"audio_k_cache_{i}", torch.zeros(heads, head_dim, self.positions, dtype=model.dtype),
                                 persistent=False)
            self.register_buffer(f"audio_v_cache_{i}", torch.zeros(heads, self.positions, head_dim, dtype=model.dtype),
                                 persistent=False)

    def forward(self, mel: torch.Tensor, conv_mask: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        step, apm = self.step, self.step.apm
        chunk, positions, heads, head_dim = step.chunk, self.positions, step.heads, step.head_dim
        start = position_ids[:1]
        slots = start + torch.arange(chunk)
        offset = torch.arange(positions) - start
        new = (offset >= 0) & (offset < chunk)
        moved = torch.index_select(attention_mask[..., positions:], 3, offset.clamp(0, chunk - 1))
        mask = torch.where(new, moved, attention_mask[..., :positions])[0]  # [1, C, P]: broadcast over heads

        dtype = apm.conv1.weight.dtype
        g = F.gelu(apm.conv1(mel.to(dtype)))[:, :, 1:-1] * conv_mask[:, None].to(dtype)
        x = F.gelu(F.conv1d(g, apm.conv2.weight, apm.conv2.bias, stride=2))
        x = x.permute(0, 2, 1) + apm.embed_positions.weight[position_ids]
        for i, layer in enumerate(apm.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)[0]
            q = (attn.q_proj(h) * attn.scaling).view(chunk, heads, head_dim).transpose(0, 1)  # [heads, C, d]
            keys, values = getattr(self, f"audio_k_cache_{i}"), getattr(self, f"audio_v_cache_{i}")
            torch.ops.aten.index_put_(keys, [None, None, slots],
                                      attn.k_proj(h).view(chunk, heads, head_dim).permute(1, 2, 0).to(keys.dtype))
            torch.ops.aten.index_put_(values, [None, slots],
                                      attn.v_proj(h).view(chunk, heads, head_dim).transpose(0, 1).to(values.dtype))
            probs = torch.softmax((torch.bmm(q, keys) + mask).float(), dim=-1)
            out = torch.bmm(probs.to(dtype), values).transpose(0, 1).reshape(1, chunk, -1)
            x = x + attn.out_proj(out)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
        emb = step.proj(apm.layer_norm(x))
        return F.avg_pool1d(emb.transpose(1, 2), step.pool, step.pool).transpose(1, 2)[0]


class TokenEmbedding(nn.Module):
    """`token_embedding`: input_ids [1,T] int64 -> raw (unscaled) embeddings [1,T,H]."""

    def __init__(self, model: MiniCPMV):
        super().__init__()
        self.embed_tokens = model.llm.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor with ordinary strides. numpy gives size-1 axes added by `[None]` stride 0, which
    torch keeps (even through clone / contiguous) and ExecuTorch rejects ("0 in strides")."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype)
    return out.copy_(torch.from_numpy(np.asarray(array)))


def decoder_inputs(embeds: np.ndarray, past: int, width: int, max_context: int) -> dict[str, np.ndarray]:
    """The inputs session.py's schedule gives one LLM call: `len(embeds)` new tokens after `past` filled
    slots, padded to `width` rows (used by the parity checks; mirrors `Session._run_llm`)."""
    n, hidden = embeds.shape
    x = np.zeros((1, width, hidden), dtype=np.float32)
    x[0, :n] = embeds
    positions = np.minimum(np.arange(past, past + width), max_context - 1).astype(np.int64)[None]
    mask = np.full((1, 1, width, max_context + width), NEG_INF, dtype=np.float32)
    mask[0, 0, :, :past] = 0.0
    mask[0, 0, :, max_context:] = np.triu(np.full((width, width), NEG_INF, dtype=np.float32), 1)
    mask[0, 0, n:, :past] = NEG_INF
    return {"inputs_embeds": x, "position_ids": positions, "attention_mask": mask,
            "last_index": np.asarray([n - 1], dtype=np.int64)}
