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
import re
import signal
from pathlib import Path

import psutil
import pytest

from dino_scale.config import dump_config, load_config
from dino_scale.engine.checkpoint import COMPLETE_MARKER, list_checkpoints
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


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The demo pretraining config, resolved once: every run of a case trains the same model
    with the same settings even if configs/demo changes meanwhile."""
    path = tmp_path_factory.mktemp("faults_config") / "pretrain.yaml"
    dump_config(load_config("configs/demo/pretrain.yaml"), path)
    return path


def _args(out: Path, shards: Path, *extra: str) -> list[str]:
    return [*small_overrides(out), f"data.train_shards={shards}", "data.max_bad_fraction=0.5",
            "data.min_samples_for_bad_fraction=4", f"optim.max_steps={MAX_STEPS}", "optim.warmup_steps=0",
            "train.checkpoint_every_steps=2", "train.keep_last_checkpoints=5", "train.export_at_end=false",
            "deepspeed.zero_stage=2", "model.msda_impl=reference", *extra]


def _logged(out: Path) -> list[tuple[int, float]]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _complete_steps(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out / "checkpoints")]


def test_kills_disk_full_and_preemption_resume_to_the_uninterrupted_losses(shards, config, tmp_path):
    shard_dir, damaged = shards
    ref = tmp_path / "reference"
    run = launch(_args(ref, shard_dir), tmp_path / "rec_ref", tmp_path / "reference.log", config=config)
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
    run = launch(args, tmp_path / "rec1", tmp_path / "run1.log", {"enospc_in_save": {"step": 4, "rank": 0}},
                 config=config)
    assert run.returncode != 0 and "No space left on device" in run.output, run.output[-4000:]
    assert _complete_steps(out) == [2] and (out / "checkpoints" / "step_4").is_dir()
    assert not (out / "checkpoints" / "step_4" / COMPLETE_MARKER).exists()
    outcomes["enospc_in_save"] = run.seconds

    # 2. rank 1 SIGKILLed half-way through saving step_4 (DeepSpeed files written, no marker)
    run = launch(args, tmp_path / "rec2", tmp_path / "run2.log", {"kill_in_save": {"step": 4, "rank": 1}},
                 config=config)
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

    hold = {"hold": {"rank": 1, "call": 2, "flag": str(flag), "release": str(release)}}
    run = launch(args, rec3, tmp_path / "run3.log", hold, during=kill_rank1, config=config)
    assert run.returncode != 0, run.output[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_2'}: step 2" in run.output

    # 4. preemption while rank 0 is inside step 5, as Kubernetes does it: SIGTERM to the pod's
    # PID 1 (k8s/scripts/deepspeed_node.py), which forwards it to the ranks; they finish the
    # step and write checkpoint step_5 before exiting
    flag, release = tmp_path / "held4", tmp_path / "release4"

    def preempt(proc):
        wait_for(flag.exists, proc, 240, "rank 0 to reach step 5")
        proc.send_signal(signal.SIGTERM)
        release.touch()
        outcomes["sigterm_exit_seconds"] = exit_within(proc, 120)

    run = launch(args, tmp_path / "rec4", tmp_path / "run4.log", {"hold": {"rank": 0, "call": 0, "flag": str(flag),
                                                                          "release": str(release)}}, during=preempt,
                 pod=True, config=config)
    assert f"resumed from {out / 'checkpoints' / 'step_4'}: step 4" in run.output, run.output[-4000:]
    assert "stop requested (SIGTERM)" in run.output and run.returncode == 128 + signal.SIGTERM, run.output[-4000:]
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


def test_nan_losses_are_skipped_then_persistent_nans_stop_the_job(shards, config, tmp_path):
    """NaN on rank 1 only: both ranks skip the step (one collective decision), weights
    untouched; 3 NaNs in a row stop the job with a clear error. The run also carries
    secret-looking storage credentials as command-line overrides: none may be written out."""
    shard_dir, _ = shards
    out = tmp_path / "out"
    key_id, secret = "AKIAFAULTNANRUN00001", "nan-run-SECRET-must-not-be-written-0123"
    args = _args(out, shard_dir, "optim.max_steps=10", "optim.max_consecutive_skipped_steps=3",
                 f"data.storage_options={{key: {key_id}, secret: {secret}}}")
    run = launch(args, tmp_path / "rec", tmp_path / "nan.log", {"nan": {"rank": 1, "calls": [1], "from": 4}},
                 config=config)
    assert run.returncode != 0, run.output[-4000:]
    assert "NonFiniteLossError: 3 consecutive steps skipped" in run.output, run.output[-4000:]

    calls = {rank: run.criterion_records(rank) for rank in (0, 1)}
    assert [r["call"] for r in calls[0]] == list(range(7)) == [r["call"] for r in calls[1]]
    assert [r["injected"] for r in calls[1]] == [False, True, False, False, True, True, True]
    assert all(r["loss_finite"] and not r["injected"] for r in calls[0])  # rank 0 saw finite losses only
    digests = [r["params_sha256"] for r in calls[0]]
    assert [r["params_sha256"] for r in calls[1]] == digests  # replicas stay identical
    assert all(r["params_finite"] for rank in (0, 1) for r in calls[rank])
    assert digests[2] == digests[1]  # the skipped step changed nothing ...
    assert digests[3] != digests[2] and digests[4] != digests[3]  # ... and training went on
    assert digests[4] == digests[5] == digests[6]  # persistent NaNs: never applied
    for rank in (0, 1):
        metrics = run.metrics(rank)
        assert metrics["dino_skipped_steps_total"] == 4 and metrics["dino_steps_total"] == 3
    assert [s for s, _ in _logged(out)] == [1, 2, 3] and all(math.isfinite(v) for _, v in _logged(out))
    assert _complete_steps(out) == [2]

    leaks = [str(p) for p in [*out.rglob("*"), *run.record_dir.rglob("*")]
             if p.is_file() and (key_id.encode() in p.read_bytes() or secret.encode() in p.read_bytes())]
    assert not leaks, leaks
    # only DeepSpeed's launcher echoes its command line (overrides included): training
    # credentials belong in the environment (AWS_*), not in overrides
    echoed = re.compile(r"\[(runner|launch)\.py:\d+:(main|sigkill_handler)\] "
                        r"(cmd = |process \d+ spawned with command|\[)")
    lines = [line for line in run.output.splitlines() if key_id in line or secret in line]
    assert lines and all(echoed.search(line) for line in lines), [line for line in lines if not echoed.search(line)]
    scanned = sum(1 for p in out.rglob("*") if p.is_file())
    record("nan_loss", faults_injected=4, samples_checked=3 * BATCH_PER_STEP, data_lost=0, skipped_steps=4,
           files_scanned_for_credentials=scanned)


def test_too_much_corrupt_data_stops_training_with_a_clear_error(shards, config, tmp_path):
    """In-process (one rank): the trainer stops on the loader's BadDataError instead of
    training on garbage, and leaves no loader worker behind."""
    from dino_scale.data import BadDataError
    from dino_scale.engine import train

    shard_dir, damaged = shards
    cfg = load_config(config, [*_args(tmp_path / "out", shard_dir), "data.max_bad_fraction=0.02",
                                                    "data.min_samples_for_bad_fraction=4"])
    children_before = set(psutil.Process().children(recursive=True))
    with pytest.raises(BadDataError, match=r"more than data.max_bad_fraction=2.00%"):
        train(cfg)
    leftover = [p for p in set(psutil.Process().children(recursive=True)) - children_before if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftover, leftover
    assert not _complete_steps(tmp_path / "out") or max(_complete_steps(tmp_path / "out")) < MAX_STEPS
    record("bad_data_fraction", faults_injected=sum(damaged.values()), samples_checked=0, data_lost=0)


def test_corrupt_data_on_one_rank_stops_the_whole_job_promptly(shards, config, tmp_path):
    """2 ranks: rank 1 passes data.max_bad_fraction while rank 0 waits for it in the next
    per-step collective; the job must end with the error, not hang."""
    shard_dir, damaged = shards
    out = tmp_path / "out"
    run = launch(_args(out, shard_dir, "data.max_bad_fraction=0.02", "data.min_samples_for_bad_fraction=4"),
                 tmp_path / "rec", tmp_path / "bad.log", timeout=150, config=config)
    assert run.returncode != 0, run.output[-4000:]
    assert "BadDataError" in run.output and "more than data.max_bad_fraction=2.00%" in run.output, run.output[-4000:]
    record("bad_data_fraction_2_ranks", faults_injected=sum(damaged.values()), samples_checked=0, data_lost=0,
           exit_seconds=round(run.seconds, 1))

