"""DINO's deformable transformer: encoder, two-stage mixed query selection, decoder with
iterative box refinement (DINO, Zhang et al. 2023, sec. 3.2-3.5).

Shapes: B batch, S = sum(H_l * W_l) flattened multi-level tokens, L levels, Q queries
(denoising + matching), D d_model. Everything is batch-first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dino_scale.models.deformable_attention import MSDeformAttn
from dino_scale.models.layers import MLP, inverse_sigmoid
from dino_scale.models.position_encoding import box_sine_embedding


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; post-norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 msda_impl: str = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DecoderLayer(nn.Module):
    """Self-attention among queries (with the denoising mask), deformable cross-attention
    into the encoder memory, FFN; post-norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 msda_impl: str = "auto") -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None):
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class Decoder(nn.Module):
    """Decoder layers with box refinement: each layer predicts a delta on its reference box.

    Look forward twice: the box passed to the next layer is detached, but the undetached box
    is returned, so layer i's output box (computed by the detector from these references)
    back-propagates into layer i-1's prediction as well.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int, checkpoint_layers: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.checkpoint_layers = checkpoint_layers

    def forward(self, tgt, reference_unsigmoid, memory, memory_padding_mask, spatial_shapes, level_start_index,
                valid_ratios, bbox_embed: nn.Module, self_attn_mask=None):
        """
        tgt [B, Q, D], reference_unsigmoid [B, Q, 4], memory [B, S, D], valid_ratios [B, L, 2]
        returns hidden states [num_layers] x [B, Q, D] (normed) and reference boxes
        [num_layers + 1] x [B, Q, 4] (sigmoid; entry i is the input box of layer i, undetached)
        """
        output = tgt
        reference = reference_unsigmoid.sigmoid()
        references = [reference]
        hidden = []
        for layer in self.layers:
            # [B, Q, L, 4]: boxes in each level's valid (unpadded) frame
            reference_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_sine = box_sine_embedding(reference_input[:, :, 0, :], self.d_model // 2)
            query_pos = self.ref_point_head(query_sine.to(output.dtype))
            output = run_layer(layer, self.checkpoint_layers, output, query_pos, reference_input, memory,
                               spatial_shapes, level_start_index, memory_padding_mask, self_attn_mask)
            new_reference = (bbox_embed(output) + inverse_sigmoid(reference)).sigmoid()
            references.append(new_reference)
            reference = new_reference.detach()
            hidden.append(self.norm(output))
        return hidden, references


@dataclass
class TransformerOutput:
    hidden: list[torch.Tensor]  # [num_dec] x [B, P + Q, D]
    references: list[torch.Tensor]  # [num_dec + 1] x [B, P + Q, 4] sigmoid boxes
    enc_hidden: torch.Tensor  # [B, Q, D] encoder memory at the selected proposals (undetached)
    enc_boxes: torch.Tensor  # [B, Q, 4] sigmoid boxes of the selected proposals (undetached)


class DeformableTransformer(nn.Module):
    def __init__(self, d_model: int = 256, n_heads: int = 8, num_queries: int = 900, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 num_classes: int = 91, msda_impl: str = "auto", checkpoint_encoder_layers: bool = False,
                 checkpoint_decoder_layers: bool = False) -> None:
        super().__init__()
        self.d_model, self.num_queries = d_model, num_queries
        self.checkpoint_encoder_layers = checkpoint_encoder_layers
        enc_layer = EncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads, enc_n_points,
                                 msda_impl)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(copy.deepcopy(enc_layer) for _ in range(num_encoder_layers))
        dec_layer = DecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads, dec_n_points,
                                 msda_impl)
        self.decoder = Decoder(dec_layer, num_decoder_layers, d_model, checkpoint_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        # learned content queries ("mixed query selection": anchors come from the encoder)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        # two-stage proposal heads on the encoder memory
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                bbox_embed: nn.Module, dn_content: torch.Tensor | None = None,
                dn_boxes_unsigmoid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                ) -> TransformerOutput:
        """srcs/pos_embeds: L x [B, D, H_l, W_l]; masks: L x [B, H_l, W_l] (True = padding)."""
        # level sizes as ints (symbolic under torch.export, so exported graphs keep them dynamic)
        level_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        spatial_shapes = torch.stack([torch.stack([torch.full((), n, dtype=torch.long, device=srcs[0].device)
                                                   for n in hw]) for hw in level_shapes])  # [L, 2]
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, D]
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        memory = src_flat
        reference_points = encoder_reference_points(level_shapes, valid_ratios)
        for layer in self.encoder.layers:
            memory = run_layer(layer, self.checkpoint_encoder_layers, memory, pos_flat, reference_points,
                               spatial_shapes, level_start_index, mask_flat)

        # two-stage: score every memory token as a proposal, keep the top Q as anchors
        output_memory, output_proposals = encoder_output_proposals(memory, mask_flat, level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_logits = self.enc_out_class_embed(output_memory)
        enc_boxes_unsig = self.enc_out_bbox_embed(output_memory) + output_proposals
        topk = torch.topk(enc_logits.max(-1)[0], self.num_queries, dim=1)[1]  # [B, Q]
        selected_boxes_unsig = torch.gather(enc_boxes_unsig, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        enc_hidden = torch.gather(output_memory, 1, topk.unsqueeze(-1).repeat(1, 1, self.d_model))
        batch_size = memory.shape[0]
        reference = selected_boxes_unsig.detach()
        tgt = self.tgt_embed.weight[None].repeat(batch_size, 1, 1)
        if dn_content is not None:
            reference = torch.cat([dn_boxes_unsigmoid, reference], 1)
            tgt = torch.cat([dn_content, tgt], 1)

        hidden, references = self.decoder(tgt, reference, memory, mask_flat, spatial_shapes, level_start_index,
                                          valid_ratios, bbox_embed, attn_mask)
        return TransformerOutput(hidden, references, enc_hidden, selected_boxes_unsig.sigmoid())


def run_layer(layer: nn.Module, checkpoint: bool, *inputs: torch.Tensor | None) -> torch.Tensor:
    """`layer(*inputs)`, with activation checkpointing when asked and training: the layer's
    activations are recomputed in backward instead of kept. The RNG state is restored for the
    recomputation, so dropout draws the same masks and outputs and gradients are unchanged."""
    if checkpoint and layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False, preserve_rng_state=True)
    return layer(*inputs)


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, H, W] -> [B, 2] (w, h): fraction of each axis that is not padding."""
    _, H, W = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)


def encoder_reference_points(level_shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid extent, then mapped into each
    level's frame: [B, S, L, 2] (x, y)."""
    points = []
    for lvl, (H, W) in enumerate(level_shapes):
        # arange, not linspace: the same exact values, and the size stays symbolic under torch.export
        ref_y, ref_x = torch.meshgrid(
            torch.arange(H, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(W, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def encoder_output_proposals(memory: torch.Tensor, padding_mask: torch.Tensor,
                             level_shapes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per memory token: its pixel centre (normalised by the valid extent) and
    a size of 0.05 * 2**level. Proposals on padding or within 0.01 of the border get +inf
    (unsigmoid) and their memory is zeroed.

    memory [B, S, D], padding_mask [B, S], level_shapes L x (H_l, W_l)
    -> (memory [B, S, D], proposals_unsigmoid [B, S, 4])
    """
    B = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (H, W) in enumerate(level_shapes):
        mask = padding_mask[:, start:start + H * W].view(B, H, W)
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(H, dtype=torch.float32, device=memory.device),
            torch.arange(W, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # [H, W, 2]
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(B, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += H * W
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return memory, proposals
