"""Shared helpers of the launcher tests: tiny demo shards and DeepSpeed launches."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from demo_data import generate_demo_data
from dino_scale.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


# torch.distributed rendezvous variables: a launcher or the script itself sets them
DIST_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV_VARS}
    e.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", DINO_NO_PROGRESS="1",
             OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd` in the repo; on a non-zero exit fail with the tail of its stderr."""
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-6000:]}"
        )
    return proc


def tiny_demo_data(base: Path) -> dict[str, Path]:
    """Demo shapes (48 pretraining, 16 fine-tuning, 8 val images of 128 px) and their
    shards; built once per pytest run under `base`. pytest-xdist workers share one copy in
    the run's folder above their own: the first to get the lock builds it, the others wait."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "tiny_demo"
    out = {"root": root, "pretrain_shards": root / "shards" / "pretrain",
           "finetune_shards": root / "shards" / "finetune",
           "pretrain_ann": root / "data" / "pretrain" / "annotations.json",
           "val_images": root / "data" / "finetune_val" / "images",
           "val_ann": root / "data" / "finetune_val" / "annotations.json"}
    with open(base / "tiny_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out["finetune_shards"] / "manifest.json").is_file():  # written last
            return out
        shutil.rmtree(root, ignore_errors=True)  # what a failed build left
        splits = generate_demo_data(root / "data", pretrain_images=48, finetune_train_images=16,
                                    val_images=8, image_size=128, seed=5)
        for split, shards in ((splits["pretrain"], out["pretrain_shards"]),
                              (splits["finetune_train"], out["finetune_shards"])):
            run_ok(
                [sys.executable, "-m", "data_pipeline.build_shards", "--annotations", str(split.annotations),
                 "--images", str(split.images), "--output", str(shards), "--samples-per-shard", "8",
                 "--num-cpus", "2", "--object-store-mb", "100"],
            )
    return out


def small_overrides(output_dir: Path) -> list[str]:
    return [f"paths.output_dir={output_dir}", "metrics.base_port=0", "metrics.log_every_steps=1",
            "deepspeed.micro_batch_per_gpu=2", "data.num_workers=1", "model.num_queries=30",
            "model.num_select=30", "model.dn_number=10", "model.enc_layers=1", "model.dec_layers=2"]


# the Swin-L configs' layout at a small width (their full-size parameter counts are checked by
# tests/test_checkpoint_convert.py)
SMALL_SWIN = ["model.num_queries=50", "model.dn_number=10",
              "model.backbone.timm_kwargs={embed_dim: 16, depths: [2, 2, 2, 2], num_heads: [1, 2, 4, 8]}"]


def deepspeed_cmd(script: str, config: str, *args: str, num_gpus: int = 2) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
            f"launch/{script}", "--config", config, *args]
