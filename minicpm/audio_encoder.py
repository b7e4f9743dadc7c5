"""The audio path of the MiniCPM-o models: Whisper encoder (`apm`), projection and average pooling.

The encoder is transformers' own `WhisperEncoder` (parameter names = the checkpoint's `apm.*`), run on
variable length with upstream chat()'s attention mask: a block-causal chunk mask (chunks of
`audio_chunk_length * 50` encoder frames, every earlier chunk visible). For one clip upstream's padding
mask masks nothing, so the chunk mask is the whole mask. Then `audio_projection_layer` (Linear, ReLU,
Linear) and AvgPool1d(pool, pool). Tokens for f mel frames: c = (f - 1) // 2 + 1, t = (c - pool) // pool + 1.

The chunked path encodes a clip chunk by chunk with a KV cache of its earlier chunks. Encoder frame j reads
mel frames 2j-2 .. 2j+2 through the two kernel-3 convolutions, so a chunk needs 2 mel frames before it and
1 after it (10 ms look-ahead); the cache carries them. Mel frames beyond the 1500-position table (30 s)
start a new piece, exactly as upstream's processor splits recorded audio into 30 s pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from minicpm.errors import UserError


def encoder_frames(mel_frames: int) -> int:
    """Encoder frames after the stride-2 convolution (upstream `_get_feat_extract_output_lengths`)."""
    return (mel_frames - 1) // 2 + 1 if mel_frames > 0 else 0


def audio_token_count(mel_frames: int, pool: int) -> int:
    """Audio tokens (placeholder length) for `mel_frames` mel frames: (c - pool) // pool + 1, at least 0."""
    return max((encoder_frames(mel_frames) - pool) // pool + 1, 0)


def block_causal_mask(size: int, chunk: int) -> torch.Tensor:
    """[size, size] bool, True = visible: frame i sees every frame of its own and all earlier chunks
    (upstream `subsequent_chunk_mask` with num_left_chunks=-1)."""
    ends = (torch.arange(size) // chunk + 1) * chunk
    return torch.arange(size)[None, :] < ends[:, None]


class AudioEncoder(WhisperEncoder):
    """transformers' Whisper encoder with a variable-length, masked and cached forward (stock forward
    insists on 3000 frames and ignores the mask)."""

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i  # the attention's cache slot (the stock encoder never caches)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """[B, mel, f] -> [B, c, d]: both convolutions with GELU (zero padding = the clip's true edges)."""
        x = nn.functional.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        return nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)

    def run_layers(self, x: torch.Tensor, start: int, mask: torch.Tensor | None,
                   cache: DynamicCache | None = None) -> torch.Tensor:
        """Positions from `start`, the layers (keys and values appended to `cache` when given), final LayerNorm."""
        end = start + x.shape[1]
        if end > self.max_source_positions:
            raise UserError(f"audio piece of {end} encoder frames exceeds the encoder's "
                            f"{self.max_source_positions}-position table")
        x = x + self.embed_positions.weight[start:end]
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
            additive = additive[None, None]
        for layer in self.layers:
            x = layer(x, additive, cache=cache) if cache is not None else layer(x, additive)
        return self.layer_norm(x)

    def forward_clip(self, features: torch.Tensor, chunk: int) -> torch.Tensor:
        """One clip [1, mel, f] (f <= 2 x positions) -> last hidden state [1, c, d]; chunk <= 0: full attention."""
        x = self.embed(features)
        mask = block_causal_mask(x.shape[1], chunk) if 0 < chunk < x.shape[1] else None
        return self.run_layers(x, 0, mask)


class AudioProjector(nn.Module):
    """Upstream `MultiModalProjector`: Linear(in, H), ReLU, Linear(H, H)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


def project_and_pool(proj: AudioProjector, states: torch.Tensor, pool: int) -> torch.Tensor:
    """[1, c, d] encoder states -> [t, H] tokens (AvgPool1d(pool, pool) over time; fewer than pool frames: none)."""
    emb = proj(states)
    if emb.shape[1] < pool:
        return emb.new_zeros(0, emb.shape[-1])
    return nn.functional.avg_pool1d(emb.transpose(1, 2), pool, pool).transpose(1, 2)[0]


def encode_clip(apm: AudioEncoder, proj: AudioProjector, pool: int, features: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """[1, mel, f] -> [t, H]: 30 s pieces (2 x positions mel frames) encoded on their own, as upstream splits
    long audio, with the chunk mask (`chunk` encoder frames; <= 0 for full attention)."""
    if features.ndim != 3 or features.shape[0] != 1 or features.shape[1] != apm.num_mel_bins:
        raise ValueError(f"audio features must be [1, {apm.num_mel_bins}, frames], got {list(features.shape)}")
    piece = 2 * apm.max_source_positions
    out = [project_and_pool(proj, apm.forward_clip(features[:, :, s:s + piece], chunk), pool)
           for s in range(0, features.shape[-1], piece)]
    return torch.cat(out) if out else proj.linear2.weight.new_zeros(0, proj.linear2.out_features)


@dataclass
class ChunkCache:
    """State of one clip between `encode_chunked` calls: mel frames not yet encoded (with the 2 frames of left
    context before them), where they start, and the encoder's keys and values of the earlier chunks."""

    mel: torch.Tensor  # [mel, n]: mel frames from (start - context) on
    start: int = 0  # first mel frame (within the current 30 s piece) not yet encoded
    context: int = 0  # mel frames before `start` kept for the convolutions (0 or 2)
    kv: DynamicCache = field(default_factory=DynamicCache)
    encoded: int = 0  # encoder frames already in `kv` (= the next position)


def encode_chunked(apm: AudioEncoder, proj: AudioProjector, pool: int, chunk: int, features: torch.Tensor,
                   cache: ChunkCache | None, final: bool) -> tuple[torch.Tensor, ChunkCache]:
    """Append mel frames [1, mel, n] to a clip and encode every chunk whose look-ahead frame has arrived (all of
    them when `final`). Returns the new tokens [t, H] and the cache; equals `encode_clip` on the whole clip."""
    if chunk <= 0 or chunk % pool:
        raise UserError(f"chunked audio encoding needs chunks of a multiple of {pool} encoder frames, got {chunk}")
    if features.ndim != 3 or features.shape[0] != 1 or features.shape[1] != apm.num_mel_bins:
        raise ValueError(f"audio features must be [1, {apm.num_mel_bins}, frames], got {list(features.shape)}")
    if cache is None:
        cache = ChunkCache(features.new_zeros(apm.num_mel_bins, 0))
    cache.mel = torch.cat([cache.mel, features[0].to(cache.mel.dtype)], dim=1)
    step, piece, out = 2 * chunk, 2 * apm.max_source_positions, []
    while True:
        available = cache.mel.shape[1] - cache.context  # mel frames from `start` on
        room = piece - cache.start  # mel frames left in this 30 s piece
        full = min(step, room)
        if available <= 0:
            break
        if available > full or (available == full and (final or room <= step)):
            take = full  # a whole chunk: its look-ahead frame is here, or the piece ends with it
        elif final:
            take = available
        else:
            break
        out.append(_encode_one_chunk(apm, proj, pool, cache, take, ends=take == room or (final and take == available)))
        if take == room:  # the 30 s piece is complete: the next frames start a new one
            cache.mel, cache.start, cache.context = cache.mel[:, cache.context:], 0, 0
            cache.kv, cache.encoded = DynamicCache(), 0
    tokens = torch.cat(out) if out else proj.linear2.weight.new_zeros(0, proj.linear2.out_features)
    return tokens, cache


def _encode_one_chunk(apm: AudioEncoder, proj: AudioProjector, pool: int, cache: ChunkCache, take: int,
                      ends: bool) -> torch.Tensor:
    """Encode mel frames [start, start + take) of the piece: conv1 over them with their context, conv2 over the
    GELU outputs 2j-1 .. 2j+1 (zero outside the piece, as the whole-clip convolutions' padding)."""
    ctx, n_enc = cache.context, encoder_frames(take)
    lookahead = 0 if ends else 1  # the clip or piece ends here: its zero padding, not a next frame
    window = cache.mel[:, : ctx + take + lookahead][None].to(apm.conv1.weight.dtype)
    g = nn.functional.gelu(apm.conv1(window))[0]  # index i = mel frame start - ctx + i; edges unreliable
    # conv2 inputs: mel frames start - 1 .. start + 2 * n_enc (exclusive), zero where outside the piece
    lo, hi = cache.start - 1, cache.start + 2 * n_enc
    rows = torch.zeros(g.shape[0], hi - lo, dtype=g.dtype)
    first = 1 if cache.start == 0 else 0  # mel frame -1 is the piece's zero padding
    valid_hi = min(hi, cache.start + take)  # frames past the piece's end are zero padding too
    rows[:, first: valid_hi - lo] = g[:, ctx - 1 + first: ctx - 1 + (valid_hi - lo)]
    x = nn.functional.gelu(nn.functional.conv1d(rows[None], apm.conv2.weight, apm.conv2.bias, stride=2))
    states = apm.run_layers(x.permute(0, 2, 1), cache.encoded, None, cache.kv)
    cache.encoded += n_enc
    keep = min(2, cache.start + take)  # left context of the next chunk
    cache.mel = cache.mel[:, ctx + take - keep:]
    cache.start, cache.context = cache.start + take, keep
    return project_and_pool(proj, states, pool)
