"""SigLIP NaViT vision encoder (parameter names of `vpm.*`, transformers' Idefics2 layout).

The upstream encoder computes bucketised position ids inside its forward with data-dependent Python;
here the host passes them in (`navit_position_ids`), so the same forward traces for export.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder, Idefics2VisionEmbeddings


class VisionEncoder(nn.Module):
    """Patch row [B, 3, p, L*p] + position ids [B, L] + patch mask [B, L] -> features [B, L, D]."""

    def __init__(self, config: Idefics2VisionConfig, num_layers: int):
        super().__init__()
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        self.config = config
        self.embeddings = Idefics2VisionEmbeddings(config)
        self.encoder = Idefics2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def num_patches_per_side(self) -> int:
        return self.embeddings.num_patches_per_side

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings.patch_embedding(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + self.embeddings.position_embedding(position_ids)
        mask = None
        if patch_mask is not None:
            # Additive mask over keys only: padded patches are never attended to.
            mask = torch.zeros(patch_mask.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~patch_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        x = self.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return self.post_layernorm(x)
