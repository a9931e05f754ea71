"""Security faults: malicious pickles in pretrained files and training checkpoints, tar
members that point outside any target, credentials in outputs, the metrics bind address."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_synthetic import build_shards_inline, make_coco
from dino_scale.config import DataConfig, MetricsConfig, dump_config, load_config
from dino_scale.metrics import TrainingMetrics
from dino_scale.weights import CheckpointError, read_weights
from faults.summary import record
from launch_helpers import REPO, env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


class Payload:
    """Unpickling this runs `os.mkdir(path)`: the proof that a loader executed it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_malicious_pretrained_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint0011.pth"  # the official layout: {"model": ..., "args": Namespace}
    torch.save({"model": {"transformer.level_embed": torch.zeros(4, 8)}, "args": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="allow-unsafe-pickle|unsafe|pickle"):
        read_weights(evil)
    assert not marker.exists()
    # the command-line converter says so too, and runs nothing
    result = subprocess.run([sys.executable, "-m", "dino_scale.checkpoint_convert", "official-to-ours", str(evil),
                             str(tmp_path / "out.safetensors")], cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and not marker.exists()
    assert "--allow-unsafe-pickle" in result.stderr + result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "out.safetensors").exists()
    record("security_pickle_pretrained", faults_injected=2, samples_checked=0, data_lost=0)


def test_tampered_training_checkpoint_is_refused_on_resume(tmp_path):
    from dino_scale.engine import Components, train
    from dino_scale.engine.checkpoint import UnsafeCheckpointError, latest_complete
    from engine_standins import TinyCriterion, TinyDetector, TinyLoader

    def components() -> Components:
        return Components(model=TinyDetector(), criterion=TinyCriterion(),
                          train_loader=lambda epoch, rank, world: TinyLoader(4, 2, rank=rank, seed=3, epoch=epoch),
                          eval_loader=lambda: None, postprocess=torch.nn.Identity(),
                          categories=[{"id": i, "name": f"c{i}"} for i in range(5)])

    def cfg(steps: int):
        return load_config(None, [f"paths.output_dir={tmp_path}", "metrics.base_port=0", "train.eval_at_end=false",
                                  "train.export_at_end=false", "deepspeed.micro_batch_per_gpu=2",
                                  f"optim.max_steps={steps}", "deepspeed.zero_stage=2"])

    train(cfg(1), components())
    step, directory = latest_complete(tmp_path / "checkpoints")
    assert step == 1
    # an honest resume works under the weights-only loader (DeepSpeed's own classes allowed)
    assert train(cfg(2), components()).step == 2
    step, directory = latest_complete(tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    optim = next(directory.glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)  # the test's own file
    state["optimizer_state_dict"]["extra"] = Payload(marker)
    torch.save(state, optim)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*optim_states.pt"):
        train(cfg(3), components())
    assert not marker.exists()
    record("security_pickle_training_checkpoint", faults_injected=1, samples_checked=0, data_lost=0)


def _tar_with_hostile_names(path: Path, escape_dir: Path) -> list[str]:
    """Rewrite shard `path`: sample members renamed to `../..`-relative and absolute paths
    that point into `escape_dir`."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    hostile = []
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            if i // 2 % 2 == 0:
                name = "../" * 12 + str(escape_dir.relative_to("/")) + "/" + name
            else:
                name = str(escape_dir / name)
            hostile.append(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    return hostile


def test_tar_members_with_absolute_or_parent_paths_are_never_written_outside(tmp_path):
    from dino_scale.data import build_train_loader

    make_coco(tmp_path / "src", num_images=10, seed=3)
    shards = tmp_path / "shards"
    manifest = build_shards_inline(tmp_path / "src", str(shards), samples_per_shard=5)
    escape = tmp_path / "escaped"
    names = []
    for shard in manifest["shards"]:
        names += _tar_with_hostile_names(shards / shard["name"], escape)
    before = sorted(p for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(shards)  # relative members would land next to the shards, absolute ones in `escape`
    try:
        cfg = DataConfig(train_shards=str(shards), num_workers=0, shuffle_buffer=4, train_scales=[48],
                         train_max_size=64, crop_scales=[40], crop_min_size=24, crop_max_size=40)
        loader = build_train_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
        ids = [int(t["image_id"]) for batch in loader for t in batch.targets]
    finally:
        os.chdir(cwd)
    assert sorted(p for p in tmp_path.rglob("*")) == before and not escape.exists()
    # read in memory, keyed by the member's base name: every sample still arrives
    assert len(ids) == 10 == len(set(ids)) and loader.stats()["samples_skipped"] == 0
    record("security_tar_paths", faults_injected=len(names), samples_checked=len(ids), data_lost=10 - len(ids))


def test_credentials_never_reach_logs_manifests_or_saved_configs(s3_bucket, tmp_path):
    make_coco(tmp_path / "src", num_images=12, seed=8)
    key_id, secret = "AKIAFAULTSUITE7777KEY", "fault-suite-SECRET-do-not-leak-0123456789"
    ray_tmp = Path("/tmp") / f"ray-faults-{os.getpid()}"
    e = {**env(), "RAY_TMPDIR": str(ray_tmp), "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    output = f"{s3_bucket.url}/shards"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "data_pipeline.build_shards",
             "--annotations", str(tmp_path / "src" / "annotations.json"),
             "--images", str(tmp_path / "src" / "images"), "--output", output, "--samples-per-shard", "4",
             "--num-cpus", "2", "--object-store-mb", "100", "--endpoint-url", s3_bucket.endpoint,
             "--storage-option", f"key={key_id}", "--storage-option", f"secret={secret}", "--log-level", "DEBUG"],
            cwd=REPO, env=e, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        texts = {"build stdout+stderr": result.stdout + result.stderr}
        fs = s3_bucket.fs()
        for path in fs.find(f"{s3_bucket.name}/shards"):
            texts[path] = fs.cat_file(path).decode("latin-1")
        ray_logs = [p for p in ray_tmp.rglob("*") if p.is_file() and "log" in str(p) and p.stat().st_size < 50 << 20]
        for path in ray_logs:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    assert len(texts) >= 1 + 3 * 2 + 2 and ray_logs  # log, 3 shards + sidecars, manifest, report; Ray's logs
    leaks = [name for name, text in texts.items() if key_id in text or secret in text]
    assert not leaks, leaks

    # the trainer's saved config: credentials given as command-line overrides are redacted
    cfg = load_config("configs/demo/pretrain.yaml", [f"data.storage_options={{key: {key_id}, secret: {secret}, "
                                                     f"endpoint_url: {s3_bucket.endpoint}}}"])
    dump_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert key_id not in saved and secret not in saved and s3_bucket.endpoint in saved
    assert cfg.data.storage_options["secret"] == secret  # the running process keeps them
    record("security_credentials", faults_injected=2, samples_checked=12, data_lost=0, files_scanned=len(texts) + 1)


def test_metrics_endpoint_binds_to_the_configured_address(tmp_path):
    metrics = TrainingMetrics(MetricsConfig(base_port=0, bind_address="127.0.0.2"), rank=0, local_rank=0)
    port = metrics.serve(tmp_path)
    try:
        with socket.create_connection(("127.0.0.2", port), timeout=5):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        metrics.shutdown()
    record("security_metrics_bind", faults_injected=0, samples_checked=0, data_lost=0)
