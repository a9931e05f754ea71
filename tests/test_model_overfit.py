"""The model, the criterion and PostProcess together: gradients reach every trainable
parameter, and a small DINO memorises a few real COCO images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_scale.config import ModelConfig, load_config
from dino_scale.models import PostProcess, build_criterion, build_dino
from dino_scale.models.box_ops import box_cxcywh_to_xyxy, box_iou

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def small_model_config(**overrides: object) -> ModelConfig:
    """configs/demo/model_small.yaml with COCO's 91 class ids and fewer layers and queries."""
    base = {
        "model.num_classes": 91,
        "model.backbone.name": "resnet10t",
        "model.enc_layers": 1,
        "model.dec_layers": 2,
        "model.dim_feedforward": 128,
        "model.num_queries": 30,
        "model.num_select": 30,
        "model.dn_number": 10,
    }
    base.update({f"model.{k}": v for k, v in overrides.items()})
    return load_config(REPO / "configs/demo/model_small.yaml", [f"{k}={v}" for k, v in base.items()]).model


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, h, w] images -> zero-padded [B, 3, H, W] and padding masks [B, H, W] (True = pad)."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, height, width)
    masks = torch.ones(len(images), height, width, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        masks[i, : im.shape[1], : im.shape[2]] = False
    return batch, masks


def load_coco_images(root: Path, image_ids: list[int], max_side: int):
    """Images resized to `max_side`, ImageNet-normalised and padded, with their non-crowd
    targets (labels = COCO category ids, boxes normalised cxcywh)."""
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    infos = {info["id"]: info for info in coco["images"]}
    images, targets = [], []
    for image_id in image_ids:
        info = infos[image_id]
        image = Image.open(root / "train2017" / info["file_name"]).convert("RGB")
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        images.append((pixels - IMAGENET_MEAN) / IMAGENET_STD)
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        x, y, w, h = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).unbind(1)
        width, height = info["width"], info["height"]
        boxes = torch.stack([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], dim=1)
        targets.append({"labels": torch.tensor([a["category_id"] for a in anns]), "boxes": boxes})
    return (*pad_batch(images), targets)


def recovered(detections: dict[str, torch.Tensor], target: dict[str, torch.Tensor], min_iou: float) -> list[bool]:
    """Per ground-truth box: is there a detection of its class overlapping it by > min_iou?"""
    iou, _ = box_iou(box_cxcywh_to_xyxy(target["boxes"]), detections["boxes"])
    same_class = target["labels"][:, None] == detections["labels"][None, :]
    return ((iou > min_iou) & same_class).any(dim=1).tolist()


@pytest.mark.parametrize("box_counts", [[2, 1], [0, 1], [0, 0]], ids=["boxes", "one-empty", "all-empty"])
def test_every_trainable_parameter_gets_a_gradient(box_counts):
    torch.manual_seed(0)
    cfg = small_model_config()
    model, criterion = build_dino(cfg).train(), build_criterion(cfg)
    # Several inits are zero by design (box heads' last layers, deformable attention's offset
    # and weight projections, timm's last BatchNorm scale of each residual block), which
    # zeroes the gradient behind them at step 0; a small nudge to every parameter makes a
    # zero gradient mean a parameter the loss does not reach.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    g = torch.Generator().manual_seed(0)
    images, masks = pad_batch([torch.randn(3, 96, 128, generator=g), torch.randn(3, 128, 80, generator=g)])
    targets = [
        {
            "labels": torch.randint(1, 91, (n,), generator=g),
            "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                               torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1),
        }
        for n in box_counts
    ]
    losses = criterion(model(images, masks, targets), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    no_grad = [name for name, p in trainable.items() if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    zero = [name for name, p in trainable.items() if p.grad.abs().sum() == 0]
    if sum(box_counts):
        assert not zero, f"zero gradient at {zero}"
    else:
        # nothing to regress or denoise: the box heads (whose boxes reach the loss only
        # through box terms; decoder references are detached) and the label embedding table
        # get exact zeros, still real gradients (not None) for DDP / ZeRO
        box_heads = ("bbox_embed.", "transformer.enc_out_bbox_embed.")
        assert zero and all(name.startswith(box_heads) or name == "label_enc.weight" for name in zero), zero
        assert "label_enc.weight" in zero


@pytest.mark.slow
def test_small_dino_overfits_real_coco_images(coco_mini):
    torch.manual_seed(0)
    images, masks, targets = load_coco_images(coco_mini, IMAGE_IDS, max_side=128)
    cfg = small_model_config()
    model, criterion = build_dino(cfg).train(), build_criterion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
    totals, matching = [], []
    for _ in range(STEPS):
        losses = criterion(model(images, masks, targets), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        totals.append(losses["loss"].item())
        # the final layer's matching-query terms, weighted; the total also holds the
        # denoising terms, whose noise is drawn afresh every step and never fits exactly
        matching.append(sum(criterion.weight_dict[k] * losses[k].item() for k in ("loss_ce", "loss_bbox", "loss_giou")))
    total_end, matching_end = sum(totals[-5:]) / 5, sum(matching[-5:]) / 5
    assert total_end < totals[0] / 4, f"total loss fell only from {totals[0]:.2f} to {total_end:.2f}"
    assert matching_end < matching[0] / 10, f"final-layer loss fell only from {matching[0]:.2f} to {matching_end:.2f}"

    model.eval()
    with torch.no_grad():
        detections = PostProcess(cfg.num_select)(model(images, masks), torch.ones(len(targets), 2))
    for image_id, dets, target in zip(IMAGE_IDS, detections, targets):
        top = {k: v[:TOP_K] for k, v in dets.items()}
        found = recovered(top, target, min_iou=0.5)
        assert all(found), f"image {image_id}: ground truth {target} not among the top {TOP_K}: {found}, {top}"


# two coco-mini images: a bear (1 box); a person beside a motorcycle (2 boxes)
IMAGE_IDS = [249346, 84533]
STEPS = 120  # measured: total loss / 5.5, final-layer loss / 40, every box found by step 60
LR = 4e-4
TOP_K = 5
