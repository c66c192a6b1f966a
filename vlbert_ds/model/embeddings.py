"""Element embeddings and the packed sequence `[CLS] text [SEP] RoI_0 .. RoI_K [END]`.

As the official `VisualLinguisticBert.embedding` (reference §1.3):

* element = (linguistic part + visual part) + position + segment, then LayerNorm(1e-12) and dropout;
* text token: word embedding + LN_text(visual vector of RoI `text_visual_index`, RoI 0 = whole image),
  or + LN_text(one learned vector shared by all words) on text-only rows (`aux_text_visual_embedding`);
* RoI: learned [IMG] (or learned mask-[IMG] when the RoI is masked) + LN_object(fused RoI vector);
* [END]: one learned vector is the whole element (no word or visual part);
* LN_text and LN_object have their gain initialised to 0, so at initialisation a text-only
  sequence is exactly BERT;
* segments: text keeps its A/B ids, RoIs and [END] get C = 2; positions: text 0..T-1, every RoI T,
  [END] T+1 (`obj_pos_id_relative`);
* elements are packed without gaps: text, then RoIs, then [END], then padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlbert_ds.model.config import VLBertConfig

SEGMENT_C = 2


@dataclass
class PackedLayout:
    """Where each part of every row sits in the packed sequence of length L."""

    element_mask: Tensor  # [B, L] bool: a real element (attend to it)
    text_length: Tensor  # [B] long
    region_count: Tensor  # [B] long
    region_positions: Tensor  # [B, R] long: index of RoI r in the packed row (valid where region_mask)


class VLBertEmbeddings(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        # Names of the BERT tables match Hugging Face so `from_bert` maps them 1:1.
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # VL-BERT's own vectors (official names in comments).
        self.end_embedding = nn.Parameter(torch.empty(hidden))  # end_embedding
        self.image_token_embedding = nn.Parameter(torch.empty(hidden))  # object_linguistic_embeddings
        self.masked_image_token_embedding = nn.Parameter(torch.empty(hidden))  # object_mask_word_embedding
        self.text_only_visual_embedding = nn.Parameter(torch.empty(hidden))  # aux_text_visual_embedding
        self.visual_ln_text = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.visual_ln_object = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.visual_ln_gain_init = config.visual_ln_gain_init
        self.initializer_range = config.initializer_range

    def reset_vl_parameters(self) -> None:
        """Initialise VL-BERT's additions: normal(0.02) vectors, visual LayerNorm gain 0."""
        for vector in (self.end_embedding, self.image_token_embedding, self.masked_image_token_embedding,
                       self.text_only_visual_embedding):
            nn.init.normal_(vector, mean=0.0, std=self.initializer_range)
        for norm in (self.visual_ln_text, self.visual_ln_object):
            nn.init.constant_(norm.weight, self.visual_ln_gain_init)
            nn.init.zeros_(norm.bias)

    def forward(
        self,
        input_ids: Tensor,
        text_mask: Tensor,
        token_type_ids: Tensor,
        has_image: Tensor,
        region_vectors: Tensor,
        region_mask: Tensor,
        region_masked: Tensor | None,
        text_visual_index: Tensor | None,
        append_end: bool = True,
    ) -> tuple[Tensor, PackedLayout]:
        """Build the packed [B, L, H] element embeddings.

        `region_vectors` [B, R, H] are the fused RoI vectors (zeros where `region_mask` is False).
        """
        batch, text_slots = input_ids.shape
        region_slots = region_mask.shape[1]
        device = input_ids.device

        # Text: word + LN_text(visual vector).
        if region_slots > 0:
            index = text_visual_index if text_visual_index is not None else torch.zeros_like(input_ids)
            token_visual = torch.gather(
                region_vectors, 1, index.clamp(0, region_slots - 1)[..., None].expand(-1, -1, region_vectors.shape[-1])
            )
            token_visual = torch.where(has_image[:, None, None], token_visual, self.text_only_visual_embedding)
        else:
            token_visual = self.text_only_visual_embedding.expand(batch, text_slots, -1)
        text_elements = self.word_embeddings(input_ids) + self.visual_ln_text(token_visual)

        # RoIs: [IMG] (or mask-[IMG]) + LN_object(fused vector).
        image_token = self.image_token_embedding.expand(batch, region_slots, -1)
        if region_masked is not None:
            image_token = torch.where(region_masked[..., None], self.masked_image_token_embedding, image_token)
        region_elements = image_token + self.visual_ln_object(region_vectors)

        # Pack: text [0, T_b), RoIs [T_b, T_b + R_b), [END] at T_b + R_b.
        text_length = text_mask.sum(1)
        region_count = region_mask.sum(1)
        total = text_length + region_count + int(append_end)
        length = int(total.max())
        grid = torch.arange(length, device=device)[None, :]
        text_end = text_length[:, None]
        region_end = text_end + region_count[:, None]
        is_text = grid < text_end
        is_region = (grid >= text_end) & (grid < region_end)
        is_end = (grid == region_end) if append_end else torch.zeros_like(is_text)

        hidden = text_elements.shape[-1]
        elements = text_elements.new_zeros(batch, length, hidden)
        elements = elements.masked_scatter(is_text[..., None], text_elements[text_mask])
        elements = elements.masked_scatter(is_region[..., None], region_elements[region_mask])
        elements = torch.where(is_end[..., None], self.end_embedding.to(elements.dtype), elements)

        segments = torch.full((batch, length), SEGMENT_C, dtype=torch.long, device=device)
        segments = segments.masked_scatter(is_text, token_type_ids[text_mask])
        positions = torch.where(is_text, grid, text_end)
        positions = torch.where(is_end, text_end + 1, positions)

        embeddings = elements + self.position_embeddings(positions) + self.token_type_embeddings(segments)
        embeddings = self.dropout(self.LayerNorm(embeddings))

        layout = PackedLayout(
            element_mask=grid < total[:, None],
            text_length=text_length,
            region_count=region_count,
            region_positions=text_end + torch.arange(region_slots, device=device)[None, :],
        )
        return embeddings, layout
