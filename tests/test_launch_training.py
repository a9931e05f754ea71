"""Real 2-process DeepSpeed launches of the entry scripts on tiny generated data:
pretraining (ZeRO-2) scraped over HTTP while it runs, fine-tuning (ZeRO-3) from an
official-format checkpoint, evaluation and inference of the result, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dino_scale.engine.checkpoint import latest_complete, read_complete_marker
from launch_helpers import REPO, deepspeed_cmd, env, run_ok, small_overrides, tiny_demo_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_demo_data(tmp_path_factory.getbasetemp())


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _start(cmd: list[str], log_path) -> subprocess.Popen:
    # output to a file: a pipe nobody reads while we poll would fill up and block the ranks
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run_scraping(cmd: list[str], port_dir, log_path) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    """Run `cmd`; while it runs, scrape every rank's endpoint until each shows a step."""
    proc = _start(cmd, log_path)
    scraped: dict[int, dict] = {}
    try:
        while proc.poll() is None and len(scraped) < 2:
            for rank in (0, 1):
                port_file = port_dir / f"rank{rank}.port"
                if rank in scraped or not port_file.is_file():
                    continue
                try:
                    values = _scrape(int(port_file.read_text()))
                except OSError:
                    continue
                if values.get("dino_steps_total", 0) >= 1:
                    scraped[rank] = values
            time.sleep(0.1)
        proc.wait(timeout=500)
    except BaseException:
        proc.kill()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, log_path.read_text()), scraped


def test_pretrain_zero2_finetune_zero3_from_official_then_evaluate(data, tmp_path):
    pre = tmp_path / "pre"
    cmd = deepspeed_cmd("pretrain_o365.py", "configs/demo/pretrain.yaml", *small_overrides(pre),
                        f"data.train_shards={data['pretrain_shards']}", "optim.max_steps=10",
                        "optim.warmup_steps=0", "deepspeed.zero_stage=2")
    result, scraped = _run_scraping(cmd, pre / "metrics", tmp_path / "pretrain.log")
    assert result.returncode == 0, result.stdout[-4000:]
    # both ranks served their own endpoint during the run
    assert sorted(scraped) == [0, 1]
    for values in scraped.values():
        assert values["dino_step_seconds_count"] >= 1
        assert values["dino_learning_rate[('group', 'rest')]"] > 0
        assert "dino_loss[('term', 'loss')]" in values and "dino_skipped_steps_total" in values
        assert values["dino_process_resident_memory_bytes"] > 0
    # DeepSpeed's per-rank shared-memory all-reduce buffers (~66 MB each) are not left in RAM
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    export = pre / "export" / "model.safetensors"
    assert export.is_file() and latest_complete(pre / "checkpoints")[0] == 10
    assert read_complete_marker(pre / "checkpoints" / "step_10")["world_size"] == 2

    official = tmp_path / "official.pth"
    run_ok([sys.executable, "-m", "dino_scale.checkpoint_convert", "ours-to-official",
            str(export), str(official)])
    ft = tmp_path / "ft"
    cmd = deepspeed_cmd("finetune_coco.py", "configs/demo/finetune.yaml", *small_overrides(ft),
                        "--pretrained", str(official), "--pretrained-categories", str(data["pretrain_ann"]),
                        f"data.train_shards={data['finetune_shards']}", f"data.val_images={data['val_images']}",
                        f"data.val_annotations={data['val_ann']}", "optim.max_steps=3",
                        "deepspeed.zero_stage=3")
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "fine-tune transfer: 4 of 6 class rows copied" in result.stdout + result.stderr
    stats = json.loads((ft / "eval" / "step_3.json").read_text())
    assert stats["num_images"] == 8 and 0.0 <= stats["AP"] <= 1.0
    ft_export = ft / "export" / "model.safetensors"
    assert ft_export.is_file() and (ft / "best.json").is_file()

    # the export evaluates without DeepSpeed to the same numbers
    out = tmp_path / "evaluate.json"
    run_ok([sys.executable, "launch/evaluate.py", "--config", "configs/demo/finetune.yaml",
            "--checkpoint", str(ft_export), "--output", str(out), *small_overrides(ft),
            f"data.val_images={data['val_images']}", f"data.val_annotations={data['val_ann']}"])
    again = json.loads(out.read_text())
    for key in ("AP", "AP50", "AP75"):
        assert again[key] == pytest.approx(stats[key], abs=1e-6)

    picture = tmp_path / "det.png"
    image = next(iter(sorted(data["val_images"].iterdir())))
    run_ok([sys.executable, "launch/infer.py", str(image), "--config", "configs/demo/finetune.yaml",
            "--checkpoint", str(ft_export), "--out", str(picture), "--threshold", "0.0",
            *small_overrides(ft)[2:]])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_checkpoints_and_the_rerun_resumes(data, tmp_path):
    out = tmp_path / "run"
    overrides = [*small_overrides(out), f"data.train_shards={data['pretrain_shards']}",
                 "train.checkpoint_every_steps=1000", "deepspeed.zero_stage=2"]
    log_path = tmp_path / "run.log"
    proc = _start(deepspeed_cmd("pretrain_o365.py", "configs/demo/pretrain.yaml", *overrides,
                                "optim.max_steps=1000"), log_path)
    log = out / "train_log.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log_path.read_text()[-4000:]
        # the node launcher (child of the `deepspeed` runner) passes SIGTERM on to the ranks
        launcher = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                        if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        launcher.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        output = log_path.read_text()
    except BaseException:
        proc.kill()
        raise
    found = latest_complete(out / "checkpoints")
    assert found is not None, output[-4000:]
    step = found[0]
    assert step >= 2 and (found[1] / "rank_state" / "rank1.pt").is_file()
    assert "stop requested (SIGTERM)" in output
    # the same command (with a near budget) resumes from that checkpoint
    result = subprocess.run(deepspeed_cmd("pretrain_o365.py", "configs/demo/pretrain.yaml", *overrides,
                                          f"optim.max_steps={step + 1}", "train.export_at_end=false"),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"resumed from {found[1]}: step {step}" in result.stdout + result.stderr
    assert latest_complete(out / "checkpoints")[0] == step + 1
