"""`python -m dino_scale.slurm submit` against a real one-node Slurm on loopback
(tests/slurm_cluster.py): pretraining to completion, a time-limit signal that checkpoints,
requeues and finishes with the losses of the uninterrupted run, and shard building on a
Ray head + worker started inside the allocation. 2 CPU ranks stand in for 2 GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_helpers import REPO, env, small_overrides, tiny_demo_data
from slurm_cluster import SlurmCluster, missing_reason, start_cluster

MAX_STEPS = 8
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def _submit(slurm: SlurmCluster, *args: str) -> str:
    cmd = [sys.executable, "-m", "dino_scale.slurm", "submit", *args]
    done = subprocess.run(cmd, cwd=REPO, env={**env(), **slurm.env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.split("Slurm job ")[1].split(":")[0]


def _wait_end(slurm: SlurmCluster, job_id: str, timeout: float, logs: Path) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = slurm.job(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(0.5)
    slurm.run("scancel", job_id, check=False)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {slurm.job(job_id)}\n{_tails(logs)}")


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.rglob("*.out")) +
                     sorted(logs.rglob("*.err")))


def _logged(out: Path) -> list[tuple[int, float]]:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _train_args(out: Path, shards: Path) -> list[str]:
    return ["pretrain", "--config", "configs/demo/pretrain.yaml", "--nodes", "1", "--gpus-per-node", "2",
            "--cpu-ranks", "--time", "00:10:00", *small_overrides(out), f"data.train_shards={shards}",
            f"optim.max_steps={MAX_STEPS}", "optim.warmup_steps=0", "train.checkpoint_every_steps=100",
            "train.keep_last_checkpoints=5", "train.export_at_end=false", "deepspeed.zero_stage=2",
            "model.msda_impl=reference"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_demo_data(tmp_path_factory.getbasetemp())["pretrain_shards"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory) -> tuple[Path, dict[str, str], float]:
    out = tmp_path_factory.mktemp("slurm_pretrain") / "run"
    start = time.monotonic()
    job_id = _submit(slurm, *_train_args(out, shards))
    info = _wait_end(slurm, job_id, 600, out / "slurm")
    return out, info, time.monotonic() - start


@pytest.mark.slow
def test_a_submitted_pretraining_job_runs_to_completion(uninterrupted):
    out, info, seconds = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, _tails(out / "slurm"))
    assert [s for s, _ in _logged(out)] == list(range(1, MAX_STEPS + 1))
    assert (out / "slurm" / "pretrain.sbatch").is_file()
    node_log = out / "slurm" / f"job-{info['JobId']}" / "node-0.out"
    assert "deepspeed_node: node 0/1, 2 ranks per node" in node_log.read_text()
    assert (out / "checkpoints" / f"step_{MAX_STEPS}").is_dir()
    print(f"uninterrupted Slurm pretraining job: {seconds:.1f} s")


@pytest.mark.slow
def test_the_time_limit_signal_checkpoints_requeues_and_the_job_finishes_with_the_uninterrupted_losses(
        slurm, shards, uninterrupted, tmp_path):
    reference = dict(_logged(uninterrupted[0]))
    out = tmp_path / "run"
    start = time.monotonic()
    job_id = _submit(slurm, *_train_args(out, shards))
    deadline = time.monotonic() + 240
    while len(_logged(out)) < 3:  # what `--signal=B:USR1@S` does at the time limit, sent now
        assert time.monotonic() < deadline and slurm.job(job_id).get("JobState") in {"PENDING", "RUNNING"}, (
            slurm.job(job_id), _tails(out / "slurm"))
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = _wait_end(slurm, job_id, 600, out / "slurm")
    seconds = time.monotonic() - start

    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, _tails(out / "slurm"))
    batch_log = (out / "slurm" / f"dino-pretrain-{job_id}.out").read_text()
    assert "time-limit signal: checkpointing" in batch_log and f"requeueing job {job_id}" in batch_log, batch_log
    node_logs = "".join(p.read_text() for p in (out / "slurm" / f"job-{job_id}").glob("node-0.*"))
    assert "stop requested (SIGTERM)" in node_logs
    resumed = [line for line in node_logs.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, resumed
    stopped_at = int(resumed[0].split("step_")[1].split(":")[0])
    assert 3 <= stopped_at < MAX_STEPS  # the checkpoint came from the signal (checkpoint_every_steps=100)

    logged = _logged(out)
    assert sorted({s for s, _ in logged}) == list(range(1, MAX_STEPS + 1))
    mismatched = [(s, v, reference[s]) for s, v in logged if v != reference[s]]
    assert not mismatched, mismatched
    print(f"interrupted at step {stopped_at}, requeued, finished: {seconds:.1f} s "
          f"(uninterrupted {uninterrupted[2]:.1f} s)")


@pytest.mark.slow
def test_a_shard_building_job_with_a_ray_head_and_worker_builds_the_coco_mini_shards(slurm, coco_mini, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "shards"
    start = time.monotonic()
    job_id = _submit(slurm, "build-shards", "--nodes", "1", "--cpus-per-task", "2", "--run-dir", str(run_dir), "--",
                     "--annotations", str(coco_mini / "annotations" / "instances_train2017.json"),
                     "--images", str(coco_mini / "train2017"), "--output", str(output), "--samples-per-shard", "20")
    info = _wait_end(slurm, job_id, 240, run_dir / "slurm")
    seconds = time.monotonic() - start
    assert info["JobState"] == "COMPLETED", (info, _tails(run_dir / "slurm"))
    batch_log = (run_dir / "slurm" / f"dino-build-shards-{job_id}.out").read_text()
    assert "2 of 2 nodes" in batch_log, batch_log  # the head and the worker
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 80 and manifest["totals"]["shards"] == 4 and not manifest["dropped"]
    assert sorted(p.name for p in output.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    print(f"Slurm shard-building job: {seconds:.1f} s")
