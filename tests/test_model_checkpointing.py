"""Activation checkpointing of the encoder and decoder layers: the same outputs and
gradients as without it (dropout included: the recomputation replays the RNG), in fp32 and
bf16, and the same training losses under DeepSpeed ZeRO 0, 2 and 3."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.engine import Components, train
from dino_scale.models import build_criterion, build_dino
from engine_standins import TinyLoader

REPO = Path(__file__).resolve().parents[1]
PARTS = {"encoder": (True, False), "decoder": (False, True), "both": (True, True)}


def _cfg(*overrides: str):
    # the demo's reduced DINO with dropout on, so that recomputation must replay the RNG
    return load_config(REPO / "configs/demo/model_small.yaml", [
        "model.num_queries=20", "model.dn_number=4", "model.dropout=0.1", "model.msda_impl=reference",
        *overrides,
    ])


def _batch(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=gen).to(dtype)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 64:] = True
    targets = [{"labels": torch.tensor([2, 7]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}]
    return images, masks, targets


def _outputs_and_grads(model, criterion, dtype):
    images, masks, targets = _batch(dtype)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # denoising noise and dropout
    out = model(images, masks, targets)
    loss = criterion({k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}, targets)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["pred_logits"].detach(), out["pred_boxes"].detach(), loss.detach(), grads


@pytest.mark.parametrize("part, dtype", [(part, torch.float32) for part in PARTS] + [("both", torch.bfloat16)])
def test_checkpointed_layers_give_the_same_outputs_and_gradients(part, dtype):
    cfg = _cfg().model
    torch.manual_seed(0)
    plain = build_dino(cfg).to(dtype).train()
    checkpointed = copy.deepcopy(plain)
    enc, dec = PARTS[part]
    checkpointed.transformer.checkpoint_encoder_layers = enc
    checkpointed.transformer.decoder.checkpoint_layers = dec
    criterion = build_criterion(cfg)
    logits, boxes, loss, grads = _outputs_and_grads(plain, criterion, dtype)
    c_logits, c_boxes, c_loss, c_grads = _outputs_and_grads(checkpointed, criterion, dtype)
    assert torch.equal(logits, c_logits) and torch.equal(boxes, c_boxes) and torch.equal(loss, c_loss)
    assert grads.keys() == c_grads.keys() and len(grads) > 100
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=0, atol=0, msg=name)


def test_the_config_switches_reach_the_layers():
    model = build_dino(_cfg("model.checkpoint_encoder_layers=true").model)
    assert model.transformer.checkpoint_encoder_layers and not model.transformer.decoder.checkpoint_layers
    model = build_dino(_cfg("model.checkpoint_decoder_layers=true").model)
    assert model.transformer.decoder.checkpoint_layers and not model.transformer.checkpoint_encoder_layers


def _train_losses(out: Path, stage: int, *overrides: str) -> list[float]:
    cfg = _cfg(f"paths.output_dir={out}", "metrics.base_port=0", "train.eval_at_end=false",
               "train.export_at_end=false", "deepspeed.micro_batch_per_gpu=2", f"deepspeed.zero_stage={stage}",
               "optim.max_steps=3", "train.checkpoint_every_steps=100", *overrides)
    torch.manual_seed(0)
    components = Components(
        model=build_dino(cfg.model), criterion=build_criterion(cfg.model), eval_loader=lambda: None,
        train_loader=lambda epoch, rank, world: TinyLoader(3, 2, rank=rank, seed=3, epoch=epoch, size=64),
        categories=[{"id": i, "name": f"c{i}"} for i in range(11)],
    )
    train(cfg, components)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpointed_training_has_the_same_losses_under_each_zero_stage(tmp_path, stage):
    plain = _train_losses(tmp_path / "plain", stage)
    checkpointed = _train_losses(tmp_path / "ckpt", stage, "model.checkpoint_encoder_layers=true",
                                 "model.checkpoint_decoder_layers=true")
    assert len(plain) == 3
    assert checkpointed == plain
