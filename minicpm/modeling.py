"""The MiniCPM-V / MiniCPM-o model: vision encoder (`vpm`), resampler, a transformers causal LM (`llm`) and,
for o-models that initialise audio, the Whisper audio encoder (`apm`) with its projection.

The speech head (`tts`) of the o-models is not built here; its weights are skipped by the loader on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM, Qwen3ForCausalLM

from minicpm.audio_encoder import AudioEncoder, AudioProjector, ChunkCache, encode_chunked, encode_clip
from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.image_processing import ImageInputs, navit_position_ids
from minicpm.resampler import Resampler, pos_embed_2d, temporal_embed
from minicpm.vision_encoder import VisionEncoder

LLM_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM,
}


class MiniCPMV(nn.Module):
    """One class for the whole family; `config.variant` says which member it is."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.config = config
        self.llm = LLM_CLASSES[config.variant.llm](config.llm)
        self.vpm = VisionEncoder(config.vision, config.vision_layers)
        self.resampler = Resampler(config.query_num, config.hidden_size, config.vision.hidden_size,
                                   temporal=config.variant.resampler == "3d")
        if config.audio is not None:  # upstream names: apm, audio_projection_layer, audio_avg_pooler
            self.apm = AudioEncoder(config.audio)
            self.audio_projection_layer = AudioProjector(config.audio.encoder_ffn_dim // 4, config.hidden_size)
            self.audio_avg_pooler = nn.AvgPool1d(config.audio_pool_step, stride=config.audio_pool_step)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    # ----- vision ---------------------------------------------------------------------------------------

    def vision_inputs(self, pixel_values: list[torch.Tensor], tgt_sizes: list[tuple[int, int]],
                      pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Host-side inputs of the vision step for a batch of slices (see `vision_inputs` below)."""
        return vision_inputs(pixel_values, tgt_sizes, self.config.slice.patch_size, self.vpm.num_patches_per_side,
                             self.config.hidden_size, pad_to)

    @torch.no_grad()
    def encode_images(self, pixel_values: list[torch.Tensor], tgt_sizes: list[tuple[int, int]],
                      batch_size: int = 16) -> torch.Tensor:
        """Patch rows of images and slices -> [N, query_num, H] features, in input order."""
        out = []
        for start in range(0, len(pixel_values), batch_size):
            inputs = self.vision_inputs(pixel_values[start:start + batch_size], tgt_sizes[start:start + batch_size])
            out.append(self.encode_batch(**inputs))
        if not out:
            return torch.zeros(0, self.config.query_num, self.config.hidden_size, dtype=self.dtype)
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, images: list[ImageInputs]) -> torch.Tensor:
        """Features for every placeholder span of a prompt's images, in order: [spans, query_num, H]."""
        flat = [im for im in images if im.temporal_ids is None]
        sliced = iter(self.encode_images([pv for im in flat for pv in im.pixel_values],
                                         [t for im in flat for t in im.tgt_sizes]))
        out = []
        for im in images:
            if im.temporal_ids is None:
                out.extend(next(sliced) for _ in im.pixel_values)
            else:
                out.append(self.encode_video_group(im)[0])
        if not out:
            return torch.zeros(0, self.config.query_num, self.config.hidden_size, dtype=self.dtype)
        return torch.stack(out)

    def encode_video_group(self, group: ImageInputs) -> torch.Tensor:
        """One group of frames -> [1, query_num, H]: keys get the 2D position plus the frame's temporal one."""
        if not self.resampler.temporal:
            raise UserError(f"{self.config.variant.name} has no temporal resampler (video needs MiniCPM-V 4.5)")
        inputs = self.vision_inputs(group.pixel_values, group.tgt_sizes)
        for i, t in enumerate(group.temporal_ids):
            if t >= 0:
                inputs["pos_embed"][i] += self.resampler.temporal_embed(t)
        valid = inputs["patch_mask"] > 0.5
        features = self.vpm(inputs["pixel_values"], inputs["position_ids"], valid)
        return self.resampler(features, inputs["pos_embed"], ~valid, frames=len(group.temporal_ids))

    def encode_batch(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, patch_mask: torch.Tensor,
                     pos_embed: torch.Tensor) -> torch.Tensor:
        valid = patch_mask > 0.5
        all_valid = bool(valid.all())
        features = self.vpm(pixel_values, position_ids, None if all_valid else valid)
        return self.resampler(features, pos_embed, None if all_valid else ~valid)

    # ----- audio ----------------------------------------------------------------------------------------

    def _audio_modules(self) -> tuple[AudioEncoder, AudioProjector, int]:
        if self.config.audio is None:
            raise UserError(f"{self.config.variant.name} has no audio encoder (audio needs MiniCPM-o with init_audio)")
        return self.apm, self.audio_projection_layer, self.config.audio_pool_step

    @torch.no_grad()
    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """One clip's log-mel features [1, 80, frames] -> [tokens, H], as upstream chat(): the block-causal
        chunk mask, projection, AvgPool1d; tokens = ((frames - 1) // 2 + 1 - pool) // pool + 1."""
        apm, proj, pool = self._audio_modules()
        return encode_clip(apm, proj, pool, features, self.config.audio_chunk_frames)

    @torch.no_grad()
    def encode_audio_chunked(self, features: torch.Tensor, cache: ChunkCache | None = None,
                             final: bool = True) -> tuple[torch.Tensor, ChunkCache]:
        """Append mel frames [1, 80, n] of a clip and encode its finished chunks (1 s = 100 mel frames) with the
        encoder's cache of the earlier chunks; `final` flushes the rest. The outputs of all calls, concatenated,
        equal `encode_audio` of the whole clip. Returns (new tokens [t, H], cache for the next call)."""
        apm, proj, pool = self._audio_modules()
        return encode_chunked(apm, proj, pool, self.config.audio_chunk_frames, features, cache, final)

    def encode_audios(self, audios: list) -> list[torch.Tensor]:
        """A prompt's audio clips (objects with `.features`, float32 [80, frames]) -> [tokens, H] each."""
        return [self.encode_audio(torch.as_tensor(a.features, dtype=torch.float32)[None]) for a in audios]

    # ----- text -----------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt token embeddings; a config with `scale_emb` scales them (upstream get_vllm_embedding)."""
        emb = self.llm.model.embed_tokens(input_ids)
        if self.config.scale_emb is not None:
            emb = emb * self.config.scale_emb
        return emb

    def embed_generated(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of generated tokens: upstream decodes through the plain LLM embedding (no scale_emb)."""
        return self.llm.model.embed_tokens(input_ids)

    def prompt_embeddings(self, input_ids: torch.Tensor, image_bounds: list[tuple[int, int]],
                          vision: torch.Tensor, audio_bounds: list[tuple[int, int]] = (),
                          audio: list[torch.Tensor] = ()) -> torch.Tensor:
        """[L] ids -> [L, H] embeddings with vision features written over the image spans, in order, and the
        audio tokens of all clips, concatenated, over the audio spans in order (one span per clip, or one per
        1 s chunk: upstream's stream_input placement)."""
        emb = self.embed_tokens(input_ids)
        tokens = torch.cat(list(audio)) if len(audio) else emb.new_zeros(0, emb.shape[-1])
        if sum(e - s for s, e in audio_bounds) != tokens.shape[0]:
            raise ValueError(f"audio placeholder spans hold {sum(e - s for s, e in audio_bounds)} tokens, "
                             f"the audio gives {tokens.shape[0]}")
        offset = 0
        for start, end in audio_bounds:
            emb[start:end] = tokens[offset:offset + end - start].to(emb.dtype)
            offset += end - start
        if len(image_bounds) != vision.shape[0]:
            raise ValueError(f"{len(image_bounds)} placeholder spans but {vision.shape[0]} vision features")
        for (start, end), feats in zip(image_bounds, vision, strict=True):
            if end - start != feats.shape[0]:
                raise ValueError(f"placeholder span [{start}, {end}) holds {end - start} tokens, "
                                 f"vision gives {feats.shape[0]}")
            emb[start:end] = feats.to(emb.dtype)
        return emb


def vision_inputs(pixel_values: list[torch.Tensor], tgt_sizes: list[tuple[int, int]], patch_size: int,
                  num_patches_per_side: int, hidden_size: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch of patch rows to `pad_to` patches (default: the longest) with host-computed NaViT position
    ids, a patch mask (1 = patch, 0 = padding) and the resampler's 2D position table."""
    lengths = [h * w for h, w in tgt_sizes]
    longest = pad_to or max(lengths)
    if max(lengths) > longest:
        raise ValueError(f"a slice has {max(lengths)} patches, more than the {longest} the vision step takes")
    batch, p = len(pixel_values), patch_size
    pixels = torch.zeros(batch, 3, p, longest * p)
    position_ids = torch.zeros(batch, longest, dtype=torch.long)
    patch_mask = torch.zeros(batch, longest)
    pos = torch.zeros(batch, longest, hidden_size)
    for i, (row, (h, w), n) in enumerate(zip(pixel_values, tgt_sizes, lengths, strict=True)):
        pixels[i, :, :, : n * p] = row
        position_ids[i, :n] = navit_position_ids(h, w, num_patches_per_side)
        patch_mask[i, :n] = 1.0
        pos[i, :n] = torch.from_numpy(pos_embed_2d(hidden_size, h, w))
    return {"pixel_values": pixels, "position_ids": position_ids, "patch_mask": patch_mask, "pos_embed": pos}


def video_inputs(groups: list[ImageInputs], frame_slots: int, patch_size: int, num_patches_per_side: int,
                 hidden_size: int, pad_to: int) -> dict[str, torch.Tensor]:
    """Inputs of `VideoGroupStep` for a batch of frame groups: each group's frames padded to `frame_slots`
    (unused slots: zero pixels, patch mask 0), `pos_embed` = 2D table + the frame's temporal sin-cos (host)."""
    too_many = [len(g.pixel_values) for g in groups if len(g.pixel_values) > frame_slots]
    if too_many:
        raise UserError(f"a video group has {max(too_many)} frames; the vision graph takes at most {frame_slots}")
    out = []
    for g in groups:
        inputs = vision_inputs(g.pixel_values, g.tgt_sizes, patch_size, num_patches_per_side, hidden_size, pad_to)
        for i, t in enumerate(g.temporal_ids):
            if t >= 0:
                inputs["pos_embed"][i, : g.tgt_sizes[i][0] * g.tgt_sizes[i][1]] += torch.from_numpy(
                    temporal_embed(hidden_size, t))
        missing = frame_slots - len(g.pixel_values)
        out.append({k: torch.cat([v, v.new_zeros((missing, *v.shape[1:]))]) for k, v in inputs.items()})
    return {k: torch.stack([o[k] for o in out]) for k in out[0]}
