"""Parameter counts of a config's DINO: `python -m dino_scale.models.summary CONFIG [key=value ...]`.

"params" counts every parameter once (shared heads once; FrozenBatchNorm statistics are
buffers, not parameters), which is how the official 46.9M (R50-4scale) and 217.2M
(Swin-L-4scale, 91 classes) figures are computed; "trainable" leaves out the frozen ResNet
stem and first stage. The model is built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

import torch
from torch import nn

from dino_scale.config import ModelConfig, load_config
from dino_scale.models import build_dino

PARTS = OrderedDict([
    ("backbone", ("backbone.",)),
    ("input_proj", ("input_proj.",)),
    ("encoder", ("transformer.encoder.", "transformer.level_embed")),
    ("two_stage", ("transformer.enc_output", "transformer.enc_out_", "transformer.tgt_embed")),
    ("decoder", ("transformer.decoder.",)),
    ("heads", ("class_embed.", "bbox_embed.")),
    ("denoising", ("label_enc.",)),
])


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    cfg.backbone.pretrained_path = None
    with torch.device("meta"):
        return build_dino(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"params", "trainable", and one entry per part of the model}."""
    counts = {"params": 0, "trainable": 0, **{part: 0 for part in PARTS}}
    for name, p in model.named_parameters():  # each shared tensor once
        counts["params"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
        part = next((k for k, prefixes in PARTS.items() if name.startswith(prefixes)), None)
        if part is None:
            raise KeyError(f"parameter {name} belongs to no part of the summary")
        counts[part] += p.numel()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_scale.models.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).model
    counts = count_parameters(build_on_meta(cfg))
    print(f"{args.config}: DINO-{cfg.num_feature_levels}scale {cfg.backbone.name}, {cfg.num_classes} classes, "
          f"{cfg.num_queries} queries")
    for key, value in counts.items():
        print(f"  {key:<11} {value:>12,d}  {value / 1e6:7.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
