"""Trainer mechanics in one process (world of 1) with a tiny stand-in model: resume
exactness, the NaN guard, checkpoint selection and pruning, export, LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.engine import Components, NonFiniteLossError, train
from dino_scale.engine.checkpoint import COMPLETE_MARKER, latest_complete, list_checkpoints
from dino_scale.engine.optim import build_param_groups, lr_factor
from dino_scale.weights import load_weights
from engine_standins import TinyCriterion, TinyDetector, TinyLoader

pytestmark = pytest.mark.timeout(300)


def _cfg(out: Path, *overrides: str):
    return load_config(None, [
        f"paths.output_dir={out}", "metrics.base_port=0", "train.eval_at_end=false",
        "deepspeed.micro_batch_per_gpu=2", *overrides,
    ])


def _components(nan_calls=None, batches_per_epoch: int = 4, nan_grad_calls=None) -> Components:
    torch.manual_seed(0)
    return Components(
        model=TinyDetector(), criterion=TinyCriterion(nan_calls, nan_grad_calls),
        train_loader=lambda epoch, rank, world: TinyLoader(batches_per_epoch, 2, rank=rank, seed=3, epoch=epoch),
        eval_loader=lambda: None, postprocess=torch.nn.Identity(),
        categories=[{"id": i, "name": f"c{i}"} for i in range(5)],
    )


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_reproduces_uninterrupted_losses(tmp_path, stage):
    common = [f"deepspeed.zero_stage={stage}", "train.checkpoint_every_steps=100",
              "optim.lr_schedule_by=step", "optim.lr_drop_milestones=[5]", "optim.warmup_steps=2"]
    full = tmp_path / "full"
    train(_cfg(full, "optim.max_steps=9", *common), _components())
    split = tmp_path / "split"
    first = train(_cfg(split, "optim.max_steps=5", *common), _components())
    assert first.step == 5 and latest_complete(split / "checkpoints")[0] == 5
    second = train(_cfg(split, "optim.max_steps=9", *common), _components())
    assert second.step == 9
    reference, resumed = _losses(full), _losses(split)
    assert sorted(resumed) == list(range(1, 10))
    # epochs of 4 batches: the resume point (step 5) is inside the second epoch
    for step in range(6, 10):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_nan_loss_skips_the_step_and_never_touches_weights(tmp_path):
    comp = _components(nan_calls={1, 2})
    before = {k: v.clone() for k, v in comp.model.state_dict().items()}
    result = train(_cfg(tmp_path, "optim.max_steps=2", "train.export_at_end=true"), comp)
    assert result.skipped_steps == 2 and result.step == 2
    weights, _ = load_weights(tmp_path / "export" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], before[k]) for k in weights)
    metrics = _losses(tmp_path)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_finite_loss_with_nan_gradients_skips_the_step(tmp_path, stage):
    comp = _components(nan_grad_calls={1})
    result = train(_cfg(tmp_path, "optim.max_steps=3", f"deepspeed.zero_stage={stage}",
                        "train.export_at_end=true"), comp)
    assert result.skipped_steps == 1 and result.step == 3
    weights, _ = load_weights(tmp_path / "export" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_too_many_consecutive_nans_stop_with_a_clear_error(tmp_path):
    comp = _components(nan_calls=set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps skipped"):
        train(_cfg(tmp_path, "optim.max_steps=5", "optim.max_consecutive_skipped_steps=3"), comp)


def test_incomplete_checkpoint_is_never_picked_and_old_ones_are_pruned(tmp_path):
    train(_cfg(tmp_path, "optim.max_steps=6", "train.checkpoint_every_steps=2",
               "train.keep_last_checkpoints=2", "train.export_at_end=false"), _components())
    ckpts = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [4, 6]
    # a save killed half-way: directory written, marker missing
    (ckpts / "step_6" / COMPLETE_MARKER).unlink()
    assert latest_complete(ckpts)[0] == 4
    result = train(_cfg(tmp_path, "optim.max_steps=7", "train.checkpoint_every_steps=100",
                        "train.export_at_end=false"), _components())
    assert result.step == 7
    log = _losses(tmp_path)
    assert set(log) >= {5, 6, 7}


def test_export_is_the_trained_module_and_loads_without_deepspeed(tmp_path):
    comp = _components()
    train(_cfg(tmp_path, "optim.max_steps=3", "deepspeed.zero_stage=3"), comp)
    weights, meta = load_weights(tmp_path / "export" / "model.safetensors")
    assert meta["categories"][1] == {"id": 1, "name": "c1"} and meta["step"] == 3
    fresh = TinyDetector()
    fresh.load_state_dict(weights)
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_param_groups_follow_official_dino_on_the_real_model():
    from dino_scale.models.dino import build_dino

    cfg = load_config("configs/demo/model_small.yaml")
    model = build_dino(cfg.model)
    groups = {g["name"]: g for g in build_param_groups(model, cfg.optim)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-4)  # official 'default' groups: lr
    assert groups["rest"]["lr"] == pytest.approx(1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in groups.values())


def test_lr_schedule_step_decay_and_warmup():
    cfg = load_config(None, ["optim.lr_drop_milestones=[2, 4]", "optim.lr_drop_gamma=0.1",
                             "optim.warmup_steps=4"]).optim
    assert lr_factor(cfg, step=0, epoch=0) == pytest.approx(0.25)
    assert lr_factor(cfg, step=3, epoch=0) == pytest.approx(1.0)
    assert lr_factor(cfg, step=10, epoch=2) == pytest.approx(0.1)
    assert lr_factor(cfg, step=10, epoch=5) == pytest.approx(0.01)
    cfg.lr_schedule_by = "step"
    assert lr_factor(cfg, step=4, epoch=0) == pytest.approx(0.01)


@pytest.mark.slow
def test_real_dino_trains_identically_under_zero2_and_zero3(tmp_path):
    """ZeRO-3 needs the trainer's adapters for DINO (embedding tables read directly,
    dataclass outputs); with them the fp32 losses match ZeRO-2's."""
    from dino_scale.data.collate import Batch

    def batches(epoch, rank, world):
        class Loader(TinyLoader):
            def __iter__(self):
                g = torch.Generator().manual_seed(epoch)
                while self.position < self.num_batches:
                    self.position += 1
                    yield Batch(torch.randn(2, 3, 96, 96, generator=g), torch.zeros(2, 96, 96, dtype=torch.bool),
                                [{"boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.3,
                                  "labels": torch.randint(1, 6, (3,), generator=g),
                                  "image_id": torch.tensor(i), "orig_size": torch.tensor([96, 96]),
                                  "size": torch.tensor([96, 96])} for i in range(2)])
        return Loader(3, 2, rank=0, seed=0, epoch=epoch)

    losses = {}
    for stage in (2, 3):
        out = tmp_path / f"z{stage}"
        cfg = load_config("configs/demo/finetune.yaml", [
            f"paths.output_dir={out}", "metrics.enabled=false", "train.eval_at_end=false",
            "train.export_at_end=false", "optim.max_steps=3", f"deepspeed.zero_stage={stage}",
            "deepspeed.micro_batch_per_gpu=2", "model.num_queries=20", "model.dn_number=6",
            "model.enc_layers=1", "model.dec_layers=2", "optim.warmup_steps=0",
        ])
        from dino_scale.models import PostProcess

        train(cfg, Components(train_loader=batches, eval_loader=lambda: None, postprocess=PostProcess(20),
                              categories=[]))
        losses[stage] = _losses(out)
    assert sorted(losses[3]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses[3][step] == pytest.approx(losses[2][step], rel=1e-5)
    assert losses[2][3] != losses[2][1]


def test_global_batch_change_is_refused_unless_allowed_then_the_schedule_counts_samples(tmp_path):
    from dino_scale.engine.checkpoint import IncompatibleCheckpointError

    common = ["train.export_at_end=false", "optim.lr_schedule_by=step"]
    train(_cfg(tmp_path, "optim.max_steps=2", *common), _components())
    with pytest.raises(IncompatibleCheckpointError, match="global batch of 2 .* this run's is 4") as err:
        train(_cfg(tmp_path, "optim.max_steps=4", "deepspeed.gradient_accumulation_steps=2", *common),
              _components())
    assert "deepspeed.gradient_accumulation_steps=1" in str(err.value)
    # allowed: each step of 4 images counts as 2 steps of the first global batch (2)
    result = train(_cfg(tmp_path, "optim.max_steps=4", "deepspeed.gradient_accumulation_steps=2",
                        "train.allow_global_batch_change=true", *common), _components())
    assert result.step == 3 and result.images == 2 * 2 + 4  # max_steps=4 reached in samples after 1 step
    with pytest.raises(IncompatibleCheckpointError, match=r"model.num_queries: checkpoint 900, now 7"):
        train(_cfg(tmp_path, "optim.max_steps=6", "model.num_queries=7", *common), _components())
