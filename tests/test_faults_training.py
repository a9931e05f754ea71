"""Fault injection into real training jobs: the DeepSpeed launcher with 2 CPU ranks running
the real (small) DINO on demo shards that carry corrupt samples.

One chain of runs in one output directory, each resuming from what the previous one left:
disk full while saving, a rank SIGKILLed while saving, a rank SIGKILLed mid-step, a
preemption (SIGTERM). Every optimizer step any of them logged must
have exactly the loss of an uninterrupted reference run (CPU, fp32): nothing lost, nothing
replayed differently. Separate runs inject NaN losses and too much corrupt data.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from dino_scale.engine.checkpoint import COMPLETE_MARKER, latest_complete, list_checkpoints
from faults.launch import exit_within, launch, wait_for
from faults.shards import corrupt_copy
from faults.summary import record
from launch_helpers import small_overrides, tiny_demo_data

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]

MAX_STEPS = 6
BATCH_PER_STEP = 2 * 2  # micro_batch_per_gpu x ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    data = tiny_demo_data(tmp_path_factory.getbasetemp())
    bad = tmp_path_factory.mktemp("faults_training") / "corrupt_shards"
    return bad, corrupt_copy(data["pretrain_shards"], bad)


def _args(out: Path, shards: Path, *extra: str) -> list[str]:
    return [*small_overrides(out), f"data.train_shards={shards}", "data.max_bad_fraction=0.5",
            "data.min_samples_for_bad_fraction=4", f"optim.max_steps={MAX_STEPS}", "optim.warmup_steps=0",
            "train.checkpoint_every_steps=2", "train.keep_last_checkpoints=5", "train.export_at_end=false",
            "deepspeed.zero_stage=2", *extra]


def _logged(out: Path) -> list[tuple[int, float]]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _complete_steps(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out / "checkpoints")]


def test_kills_disk_full_and_preemption_resume_to_the_uninterrupted_losses(shards, tmp_path):
    shard_dir, damaged = shards
    ref = tmp_path / "reference"
    run = launch(_args(ref, shard_dir), tmp_path / "rec_ref", tmp_path / "reference.log")
    assert run.returncode == 0, run.output[-4000:]
    reference = dict(_logged(ref))
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(v) for v in reference.values())
    # corrupt samples were met, skipped, logged and exported as a metric; training went on
    skipped = {rank: {k: v for k, v in run.metrics(rank).items() if k.startswith("dino_data_skipped_samples")}
               for rank in (0, 1)}
    assert sum(sum(s.values()) for s in skipped.values()) >= 1, skipped
    assert {k.split("'")[3] for s in skipped.values() for k in s} <= set(damaged)
    samples_read = sum(run.metrics(rank)["dino_data_samples_read"] for rank in (0, 1))
    assert "skipped sample" in run.output

    out = tmp_path / "chain"
    args = _args(out, shard_dir)
    outcomes = {}

    # 1. disk full while rank 0 writes checkpoint step_4: the job stops, step_2 stays the resume point
    run = launch(args, tmp_path / "rec1", tmp_path / "run1.log", {"enospc_in_save": {"step": 4, "rank": 0}})
    assert run.returncode != 0 and "No space left on device" in run.output, run.output[-4000:]
    assert _complete_steps(out) == [2] and (out / "checkpoints" / "step_4").is_dir()
    assert not (out / "checkpoints" / "step_4" / COMPLETE_MARKER).exists()
    outcomes["enospc_in_save"] = run.seconds

    # 2. rank 1 SIGKILLed half-way through saving step_4 (DeepSpeed files written, no marker)
    run = launch(args, tmp_path / "rec2", tmp_path / "run2.log", {"kill_in_save": {"step": 4, "rank": 1}})
    assert run.returncode != 0, run.output[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_2'}: step 2" in run.output
    assert _complete_steps(out) == [2] and any((out / "checkpoints" / "step_4").glob("*.pt"))
    outcomes["kill_in_save"] = run.seconds

    # 3. rank 1 SIGKILLed in the middle of step 5: the launcher ends the job (no hang)
    flag, release = tmp_path / "held3", tmp_path / "release3"
    rec3 = tmp_path / "rec3"

    def kill_rank1(proc):
        wait_for(flag.exists, proc, 240, "rank 1 to reach step 5")
        assert _complete_steps(out) == [2, 4]
        os.kill(int((rec3 / "rank1.pid").read_text()), signal.SIGKILL)
        outcomes["sigkill_rank_exit_seconds"] = exit_within(proc, 60)

    run = launch(args, rec3, tmp_path / "run3.log", {"hold": {"rank": 1, "call": 2, "flag": str(flag),
                                                             "release": str(release)}}, during=kill_rank1)
    assert run.returncode != 0, run.output[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_2'}: step 2" in run.output

    # 4. preemption (SIGTERM to the launcher) while rank 0 is inside step 5: the ranks finish
    # the step and write checkpoint step_5 before exiting (resuming from a preemption
    # checkpoint is also covered by tests/test_launch_training.py)
    flag, release = tmp_path / "held4", tmp_path / "release4"

    def preempt(proc):
        wait_for(flag.exists, proc, 240, "rank 0 to reach step 5")
        proc.send_signal(signal.SIGTERM)
        release.touch()
        outcomes["sigterm_exit_seconds"] = exit_within(proc, 120)

    run = launch(args, tmp_path / "rec4", tmp_path / "run4.log", {"hold": {"rank": 0, "call": 0, "flag": str(flag),
                                                                          "release": str(release)}}, during=preempt)
    assert f"resumed from {out / 'checkpoints' / 'step_4'}: step 4" in run.output, run.output[-4000:]
    assert "stop requested (SIGTERM)" in run.output and run.returncode != 0
    assert _complete_steps(out) == [2, 4, 5]

    logged = _logged(out)
    assert {s for s, _ in logged} == set(range(1, 6))
    mismatched = [(s, v, reference[s]) for s, v in logged if v != reference[s]]
    assert not mismatched, mismatched  # bit-identical losses, replayed steps included
    record("training_chain", faults_injected=4 + 5,  # 4 process faults, 4 bad samples + 1 cut shard
           samples_checked=len(logged) * BATCH_PER_STEP,
           data_lost=len(mismatched),
           steps_logged=len(logged), steps_replayed=len(logged) - 5, reference_samples_read=int(samples_read),
           corrupt_samples_skipped=int(sum(sum(s.values()) for s in skipped.values())),
           **{k: round(v, 1) for k, v in outcomes.items()})
