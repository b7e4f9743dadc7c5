"""The device split: the torch modules every exporter traces and the runtime's torch backend runs.

- `VisionStep`: a batch of fixed-size patch rows (one image or slice each) -> `query_num` x H features.
  Position ids, the patch mask and the resampler position table are host inputs (no data-dependent Python).
- `LanguageModelStep`: T new embeddings + C KV cache slots -> logits of one chosen position and the K/V
  of the T new tokens. Positions, the additive attention mask and where the new K/V go are the host's
  business, so one graph serves chunked prefill (T = chunk) and decode (T = 1).
- `AudioChunkStep` (MiniCPM-o): one 1 s chunk of mel frames + the encoder cache of the clip's earlier chunks ->
  its audio tokens and the chunk's K/V (the host keeps the cache, as for the LLM).
- The token embedding is a table the host indexes (see `token_embedding_table`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from minicpm.modeling import MiniCPMV


class HostCache:
    """A cache the host keeps (graph inputs/outputs): layer i attends over its past slots then the new tokens, and
    the new keys/values are collected as the step's outputs [layers, heads, T, head_dim]."""

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values = past_keys, past_values
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend_over(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(k[0])
        self.values.append(v[0])
        return (torch.cat([self.past_keys[i : i + 1].to(k.dtype), k], dim=2),
                torch.cat([self.past_values[i : i + 1].to(v.dtype), v], dim=2))

    def new(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.keys), torch.stack(self.values)


class VisionStep(nn.Module):
    """pixel_values [B,3,p,P*p], position_ids [B,P] int64, patch_mask [B,P] (1 = patch, 0 = padding),
    pos_embed [B,P,H] -> features [B, query_num, H]."""

    def __init__(self, model: MiniCPMV):
        super().__init__()
        self.vpm = model.vpm
        self.resampler = model.resampler

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, patch_mask: torch.Tensor,
                pos_embed: torch.Tensor) -> torch.Tensor:
        valid = patch_mask > 0.5
        features = self.vpm(pixel_values, position_ids, valid)
        return self.resampler(features, pos_embed, ~valid)


class VideoGroupStep(nn.Module):
    """The 3D resampler path (MiniCPM-V 4.5 video): G groups of F fixed frame slots -> one output per group.

    pixel_values [G,F,3,p,P*p], position_ids [G,F,P] int64, patch_mask [G,F,P] (an unused frame slot is all 0),
    pos_embed [G,F,P,H] (2D table plus the frame's temporal sin-cos, host data) -> features [G, query_num, H].
    Frames run through the encoder like slices; the resampler attends over the keys of all frames of a group.
    """

    def __init__(self, model: MiniCPMV, resampler: nn.Module | None = None):
        super().__init__()
        self.vpm = model.vpm
        self.resampler = resampler or model.resampler

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, patch_mask: torch.Tensor,
                pos_embed: torch.Tensor) -> torch.Tensor:
        groups, frames, patches = patch_mask.shape
        valid = patch_mask.reshape(groups * frames, patches) > 0.5
        features = self.vpm(pixel_values.flatten(0, 1), position_ids.flatten(0, 1), valid)
        # An all-padding frame slot can give non-finite encoder rows (every key masked); zero them so the
        # resampler's zero attention weights on them stay exact zeros.
        features = torch.where(valid[..., None], features, torch.zeros_like(features))
        return self.resampler(features, pos_embed.flatten(0, 1), ~valid, frames=frames)


class LanguageModelStep(nn.Module):
    """One LLM call of the device schedule.

    inputs_embeds [1,T,H], position_ids [1,T] int64, attention_mask [1,1,T,C+T] additive (keys: the C cache
    slots, then the T new tokens), last_index [1] int64 (which of the T rows gives logits),
    past_keys / past_values [L,kv_heads,C,head_dim] -> logits [1,V], new_keys / new_values [L,kv_heads,T,head_dim].
    """

    def __init__(self, model: MiniCPMV, max_context: int):
        super().__init__()
        llm = model.llm
        cfg = llm.config
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.lm_head = llm.lm_head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        original = (getattr(cfg, "rope_parameters", None) or {}).get("original_max_position_embeddings")
        if original and max_context > original:
            raise ValueError(f"max_context {max_context} exceeds the rope table's original context {original}")
        # cos/sin for every position, computed once by the model's own rotary embedding (LongRoPE included).
        positions = torch.arange(max_context)[None]
        dtype = llm.model.embed_tokens.weight.dtype
        cos, sin = llm.model.rotary_emb(torch.zeros(1, dtype=dtype), positions)
        self.register_buffer("rope_cos", cos[0].float(), persistent=False)
        self.register_buffer("rope_sin", sin[0].float(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = HostCache(past_keys, past_values)
        logits = self.run_layers(inputs_embeds, position_ids, attention_mask, last_index, cache.attend_over)
        return logits, *cache.new()

    def run_layers(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   last_index: torch.Tensor, attend_over: Callable[[int, torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The decoder stack. `attend_over(layer, k, v)` gets the new tokens' rotated keys and values
        [1, kv_heads, T, head_dim] and returns the keys/values to attend over, matching the mask's last axis
        (here: cache then new tokens; a stateful exporter writes its cache buffer and returns it)."""
        hidden = inputs_embeds
        dtype = hidden.dtype
        cos = self.rope_cos[position_ids].to(dtype)
        sin = self.rope_sin[position_ids].to(dtype)
        batch, tokens = hidden.shape[:2]
        mask = attention_mask.repeat(1, 1, self.groups, 1)  # [1, 1, groups * T, keys]: the rows of every group
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, tokens, -1, self.head_dim)
            k = attn.k_proj(x).view(batch, tokens, -1, self.head_dim)
            v = attn.v_proj(x).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys, values = attend_over(i, k, v)
            # GQA without copying the cache per query head: query head h reads KV head h // groups, so the
            # groups sharing a KV head are stacked as rows [groups * T] of one product (row g * T + t).
            q = q.reshape(batch, self.kv_heads, self.groups * tokens, self.head_dim)
            scores = torch.matmul(q, keys.transpose(2, 3)) * self.scaling + mask
            probs = torch.softmax(scores.float(), dim=-1).to(dtype)
            out = torch.matmul(probs, values).reshape(batch, -1, tokens, self.head_dim)
            out = out.transpose(1, 2).reshape(batch, tokens, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = torch.index_select(self.norm(hidden), 1, last_index)
        return self.lm_head(last)[:, 0]


class AudioChunkStep(nn.Module):
    """One 1 s chunk of a MiniCPM-o clip through the audio encoder, with the keys/values of the clip's earlier
    chunks (upstream's block-causal chunk mask: a chunk sees itself and every earlier chunk), so one graph serves
    recorded clips and live input. The host (runtime/audio_chunks.py) cuts the windows and keeps the cache.

    mel [1, n_mels, 2C+3]: mel frames start-2 .. start+2C (2 frames of left context for the convolutions, the 2C
    frames of the chunk, 1 look-ahead), zero outside the clip's 30 s piece; conv_mask [1, 2C+1]: 1 where the
    conv2 input (conv1 output of mel frame start-1 ..) lies inside the piece (the whole-clip conv2's zero padding);
    position_ids [C] int64; attention_mask [1, 1, C, P+C] additive over the P cache slots then the C new frames;
    past_keys / past_values [layers, heads, P, head_dim] -> tokens [C / pool, H], new_keys / new_values
    [layers, heads, C, head_dim]. C = encoder frames per chunk (50), P = the encoder's position table (1500).
    """

    def __init__(self, model: MiniCPMV):
        super().__init__()
        self.apm = model.apm
        self.proj = model.audio_projection_layer
        self.pool = model.config.audio_pool_step
        self.chunk = model.config.audio_chunk_frames
        self.heads = self.apm.layers[0].self_attn.num_heads
        self.head_dim = self.apm.layers[0].self_attn.head_dim

    def forward(self, mel: torch.Tensor, conv_mask: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = HostCache(past_keys, past_values)
        tokens = self.run_layers(mel, conv_mask, position_ids, attention_mask, cache.attend_over)
        return tokens, *cache.new()

    def run_layers(self, mel: torch.Tensor, conv_mask: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor, attend_over: Callable[[int, torch.Tensor, torch.Tensor],
                                                                       tuple[torch.Tensor, torch.Tensor]]
                   ) -> torch.Tensor:
        """Convolutions, the Whisper layers as transformers' WhisperEncoderLayer computes them (query scaled
        before the product), the final LayerNorm, the projection and the average pooling. `attend_over(layer, k, v)`
        returns the keys/values to attend over, matching the mask's last axis (as LanguageModelStep's)."""
        apm = self.apm
        dtype = apm.conv1.weight.dtype
        g = nn.functional.gelu(apm.conv1(mel.to(dtype)))[:, :, 1:-1] * conv_mask[:, None].to(dtype)
        x = nn.functional.gelu(nn.functional.conv1d(g, apm.conv2.weight, apm.conv2.bias, stride=2))
        x = x.permute(0, 2, 1) + apm.embed_positions.weight[position_ids]
        frames = x.shape[1]
        for i, layer in enumerate(apm.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = (attn.q_proj(h) * attn.scaling).view(1, frames, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, frames, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, frames, self.heads, self.head_dim).transpose(1, 2)
            keys, values = attend_over(i, k, v)
            probs = torch.softmax((torch.matmul(q, keys.transpose(2, 3)) + attention_mask).float(), dim=-1)
            out = torch.matmul(probs.to(dtype), values).transpose(1, 2).reshape(1, frames, -1)
            x = x + attn.out_proj(out)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
        emb = self.proj(apm.layer_norm(x))
        return nn.functional.avg_pool1d(emb.transpose(1, 2), self.pool, self.pool).transpose(1, 2)[0]


def token_embedding_table(model: MiniCPMV) -> torch.Tensor:
    """[V, H] table the host indexes. Kept out of the graphs: a lookup is a memcpy on every device, and the
    host must apply upstream's embedding scale to prompt tokens only (see manifest schedule)."""
    return model.llm.model.embed_tokens.weight.detach()
