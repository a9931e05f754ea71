"""The DINO detector: backbone -> input projections -> deformable transformer with
two-stage query selection and contrastive denoising -> shared class / box heads, and the
names the official IDEA-Research DINO gives its parameters."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from dino_scale.config import ModelConfig
from dino_scale.models import swin
from dino_scale.models.backbone import build_backbone
from dino_scale.models.denoising import prepare_denoising
from dino_scale.models.layers import MLP, inverse_sigmoid
from dino_scale.models.position_encoding import PositionEmbeddingSine
from dino_scale.models.transformer import DeformableTransformer

Targets = list[dict[str, torch.Tensor]]

_OFFICIAL_HEAD = re.compile(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.(.+)$")
_OFFICIAL_SWIN_NORM = re.compile(r"^norm(\d+)\.(.+)$")


class DINO(nn.Module):
    """`model(images [B,3,H,W], masks [B,H,W] (True = padding), targets=None)` -> dict:

    pred_logits [B, Q, C], pred_boxes [B, Q, 4] (normalised cxcywh) of the last decoder
    layer's matching queries; in training also
    aux_outputs   (dec_layers - 1) x {pred_logits, pred_boxes} for decoder layers 0..L-2,
    enc_outputs   {pred_logits, pred_boxes} of the top-Q encoder proposals,
    dn_outputs    dec_layers x {pred_logits [B, P, C], pred_boxes [B, P, 4]} and
    dn_meta       {pad_size P, num_groups G, single_pad P // G} when denoising ran
                  (training with targets holding at least one box).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_queries = cfg.num_queries
        self.num_classes = cfg.num_classes
        self.dn_number = cfg.dn_number
        self.dn_label_noise_ratio = cfg.dn_label_noise_ratio
        self.dn_box_noise_scale = cfg.dn_box_noise_scale
        self.num_feature_levels = cfg.num_feature_levels

        self.backbone = build_backbone(cfg.backbone)
        self.position_embedding = PositionEmbeddingSine(
            d // 2, cfg.position_temperature, cfg.position_temperature
        )
        channels = self.backbone.num_channels
        if cfg.num_feature_levels < len(channels):
            raise ValueError(
                f"num_feature_levels ({cfg.num_feature_levels}) is less than the "
                f"{len(channels)} backbone stages returned (backbone.return_stages)"
            )
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels]
        in_channels = channels[-1]
        for _ in range(cfg.num_feature_levels - len(channels)):
            projections.append(
                nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d))
            )
            in_channels = d
        self.input_proj = nn.ModuleList(projections)

        self.transformer = DeformableTransformer(
            d_model=d, n_heads=cfg.num_heads, num_queries=cfg.num_queries, num_encoder_layers=cfg.enc_layers,
            num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
            num_feature_levels=cfg.num_feature_levels, enc_n_points=cfg.enc_n_points,
            dec_n_points=cfg.dec_n_points, num_classes=cfg.num_classes, msda_impl=cfg.msda_impl,
            checkpoint_encoder_layers=cfg.checkpoint_encoder_layers,
            checkpoint_decoder_layers=cfg.checkpoint_decoder_layers,
        )
        # one class head and one box head shared by every decoder layer
        self.class_embed = nn.Linear(d, cfg.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        labelbook = cfg.dn_labelbook_size if cfg.dn_labelbook_size is not None else cfg.num_classes
        self.label_enc = nn.Embedding(labelbook + 1, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)  # initial foreground probability 0.01
        for head in (self.class_embed, self.transformer.enc_out_class_embed):
            nn.init.constant_(head.bias, prior_bias)
        for box in (self.bbox_embed, self.transformer.enc_out_bbox_embed):
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: Targets | None = None) -> dict:
        srcs, level_masks, pos = self._multi_level_features(images, masks)

        dn = None
        if self.training and targets is not None and self.dn_number > 0:
            dn = prepare_denoising(
                targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                self.num_classes, self.num_queries, self.label_enc,
            )
        out = self.transformer(
            srcs, level_masks, pos, self.bbox_embed,
            dn_content=dn.content if dn else None,
            dn_boxes_unsigmoid=dn.boxes_unsigmoid if dn else None,
            attn_mask=dn.attn_mask if dn else None,
        )
        # keeps label_enc in the graph when no denoising query was built (DDP / ZeRO)
        hidden = [out.hidden[0] + self.label_enc.weight[0, 0] * 0.0] + out.hidden[1:]

        # box of layer i: refine layer i's input box (look forward twice: undetached)
        logits, boxes = [], []
        for h, ref in zip(hidden, out.references[:-1]):
            boxes.append((self.bbox_embed(h) + inverse_sigmoid(ref)).sigmoid())
            logits.append(self.class_embed(h))

        pad = dn.meta["pad_size"] if dn else 0
        result = {"pred_logits": logits[-1][:, pad:], "pred_boxes": boxes[-1][:, pad:]}
        if self.training:
            result["aux_outputs"] = [
                {"pred_logits": c[:, pad:], "pred_boxes": b[:, pad:]} for c, b in zip(logits[:-1], boxes[:-1])
            ]
            result["enc_outputs"] = {
                "pred_logits": self.transformer.enc_out_class_embed(out.enc_hidden),
                "pred_boxes": out.enc_boxes,
            }
            if dn:
                result["dn_outputs"] = [{"pred_logits": c[:, :pad], "pred_boxes": b[:, :pad]}
                                        for c, b in zip(logits, boxes)]
                result["dn_meta"] = dict(dn.meta)
        return result

    def _multi_level_features(self, images: torch.Tensor, masks: torch.Tensor
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Projected features, padding masks and position encodings, one per level."""
        features = self.backbone(images)
        srcs, level_masks = [], []
        for level, feature in enumerate(features):
            srcs.append(self.input_proj[level](feature))
            level_masks.append(_resize_mask(masks, feature.shape[-2:]))
        for level in range(len(features), self.num_feature_levels):
            # the first extra level reads the last backbone map, later ones the previous level
            src = self.input_proj[level](features[-1] if level == len(features) else srcs[-1])
            srcs.append(src)
            level_masks.append(_resize_mask(masks, src.shape[-2:]))
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(level_masks, srcs)]
        return srcs, level_masks, pos


def _resize_mask(mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Nearest-neighbour downsampling of a [B, H, W] padding mask (as DETR does).

    The source rows/columns of F.interpolate(mode="nearest"), computed as its CPU kernel
    does (float32 scale in/out, floor, clamp), picked by indexing: the same mask, and an
    exported graph keeps it (ONNX Resize rounds differently and moved the padding edge).
    """
    height, width = size
    rows = _nearest_source_index(mask.shape[1], height, mask.device)
    cols = _nearest_source_index(mask.shape[2], width, mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


def _nearest_source_index(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / out_size
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long()
    return index.clamp(max=in_size - 1)


def build_dino(cfg: ModelConfig) -> DINO:
    return DINO(cfg)


# The official names differ from ours in the backbone (official `backbone.0.body.*` ResNet
# is our `backbone.body.*`; official Swin keys are remapped by the Swin family, its
# per-output LayerNorms `backbone.0.norm{i}` are our `backbone.norms.{i}`) and in the shared
# heads (official `class_embed.{i}`, `bbox_embed.{i}` and `transformer.decoder.{class,bbox}_embed.{i}`
# are one tensor under 2 * dec_layers names; ours is `class_embed` / `bbox_embed`).


def official_to_ours_key(key: str) -> str:
    """The name of official key `key` in our model (several official names may share one)."""
    m = _OFFICIAL_HEAD.match(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if key.startswith("backbone.0.body."):
        return "backbone.body." + key[len("backbone.0.body."):]
    if key.startswith("backbone.0."):
        rest = key[len("backbone.0."):]
        m = _OFFICIAL_SWIN_NORM.match(rest)
        if m:
            return f"backbone.norms.{m.group(1)}.{m.group(2)}"
        return "backbone.body." + swin.official_to_timm_key(rest)
    return key


def ours_to_official_keys(key: str, num_decoder_layers: int) -> list[str]:
    """All official names of our key `key` (2 * dec_layers names for a shared head)."""
    head, _, rest = key.partition(".")
    if head in ("class_embed", "bbox_embed"):
        return [f"{prefix}{head}.{i}.{rest}" for prefix in ("", "transformer.decoder.")
                for i in range(num_decoder_layers)]
    if key.startswith("backbone.norms."):
        stage, _, rest = key[len("backbone.norms."):].partition(".")
        return [f"backbone.0.norm{stage}.{rest}"]
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        if rest.startswith(("patch_embed.", "layers.")):  # Swin
            return ["backbone.0." + swin.timm_to_official_key(rest)]
        return ["backbone.0.body." + rest]  # ResNet
    return [key]
