"""The sbatch scripts `python -m dino_scale.slurm submit` writes (no cluster needed;
tests/test_slurm.py runs them on a real Slurm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dino_scale.slurm import Job, render
from launch_helpers import REPO, env


def _job(stage: str, args: list[str], **kw) -> Job:
    return Job(stage=stage, run_dir=Path("/runs/r"), workdir=REPO, python=sys.executable, args=args, **kw)


def test_a_two_node_training_script_starts_one_node_launcher_per_node_and_requeues_on_the_time_limit():
    text = render(_job("pretrain", ["--config", "c.yaml", "optim.lr=2e-4"], nodes=2, gpus_per_node=8,
                       time="12:00:00", partition="gpu", signal_seconds=300))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --time=12:00:00",
                 "#SBATCH --partition=gpu", "TRAIN=(launch/pretrain_o365.py --config c.yaml optim.lr=2e-4)"):
        assert line in text.splitlines(), line
    assert '--node_rank "$SLURM_NODEID"' in text and "k8s/scripts/deepspeed_node.py" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_ranks_ask_slurm_for_cpus_not_gpus_and_shard_building_starts_ray_in_the_allocation():
    text = render(_job("pretrain", ["--config", "c.yaml"], gpus_per_node=2, cpu_ranks=True))
    assert "#SBATCH --cpus-per-task=2" in text and "--gpus-per-node" not in text
    shards = render(_job("build-shards", ["--annotations", "a b.json", "--images", "i", "--output", "o"]))
    assert "--head --block --num-cpus=0" in shards and "--requeue" not in shards
    assert "-m data_pipeline.build_shards --annotations 'a b.json' --images i --output o --ray-address" in shards
    subprocess.run(["bash", "-n"], input=shards, text=True, check=True)


def test_a_bad_override_stops_the_submission_before_anything_is_queued(tmp_path):
    cmd = [sys.executable, "-m", "dino_scale.slurm", "submit", "pretrain", "--config", "configs/demo/pretrain.yaml",
           "--dry-run", f"paths.output_dir={tmp_path}", "optim.no_such_key=1"]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert done.returncode != 0 and "no_such_key" in done.stderr
    assert not (tmp_path / "slurm").exists()


def test_finetuning_needs_pretrained_weights_and_passes_them_to_the_entry_point(tmp_path):
    base = [sys.executable, "-m", "dino_scale.slurm", "submit", "finetune", "--config", "configs/demo/finetune.yaml",
            "--dry-run", f"paths.output_dir={tmp_path}"]
    refused = subprocess.run(base, cwd=REPO, env=env(), capture_output=True, text=True)
    assert refused.returncode != 0 and "--pretrained is required" in refused.stderr
    done = subprocess.run([*base, "--pretrained", "ckpt/model.safetensors", "--nodes", "2"], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    train = next(line for line in done.stdout.splitlines() if line.startswith("TRAIN=("))
    assert train.startswith("TRAIN=(launch/finetune_coco.py --config ")
    assert "--pretrained ckpt/model.safetensors" in train
    assert f"paths.output_dir={tmp_path}" in train and f"RUN_DIR={tmp_path}" in done.stdout
    assert not (tmp_path / "slurm").exists()  # a dry run writes nothing
