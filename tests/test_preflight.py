"""The preflight (`python -m dino_scale.preflight`) and the one-line errors of every user
command (`dino_scale.errors.run_command`): exit status 2, one `prog: error: ...` line per
problem on stderr, no traceback unless `--debug` / DINO_DEBUG=1.

Most cases call a command's `main` in-process through `run_command` (the path `__main__`
takes); a few run the real processes, one of them under the DeepSpeed launcher with 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate as evaluate_script
import finetune_coco
import infer as infer_script
import pretrain_o365
from data_pipeline import build_shards
from dino_scale import checkpoint_convert, errors
from dino_scale.config import config_to_dict, load_config
from dino_scale.engine.distributed import free_port
from dino_scale.errors import run_command, user_message
from dino_scale.log import setup_logging
from dino_scale.preflight import Plan, run_preflight
from dino_scale.preflight.checks import meta_model
from dino_scale.weights import save_weights
from launch_helpers import DEEPSPEED, env

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo" / "pretrain.yaml")
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null",
                  "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": None, "AWS_ENDPOINT_URL_S3": None}


def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in NO_CREDENTIALS.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def plant_shards(root: Path, category_ids: list[int], sizes: dict[str, int], listed: dict[str, int]) -> Path:
    """A shard directory whose manifest lists `listed` {name: bytes}; files of `sizes` exist."""
    root.mkdir(parents=True)
    for name, size in sizes.items():
        (root / name).write_bytes(b"\0" * size)
    manifest = {"version": 1, "shards": [{"name": n, "samples": 4, "boxes": 8, "crowd_boxes": 0, "bytes": b,
                                          "sha256": "0" * 64} for n, b in listed.items()],
                "totals": {"samples": 4 * len(listed)},
                "categories": [{"id": i, "name": f"c{i}"} for i in category_ids]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def one_liner(capsys: pytest.CaptureFixture, code: int, *expected: str) -> list[str]:
    """Exit status 2, stderr nothing but `error:` lines (one per problem), each expected text in them."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(": error: " in line for line in lines), err
    for text in expected:
        assert any(text in line for line in lines), f"{text!r} not in {lines}"
    return lines


# ---------------------------------------------------------------------------------------
# the preflight
# ---------------------------------------------------------------------------------------


def test_a_good_local_config_passes(tmp_path: Path) -> None:
    shards = plant_shards(tmp_path / "shards", [1, 2, 3], {"shard-000000.tar": 10, "shard-000001.tar": 12},
                          {"shard-000000.tar": 10, "shard-000001.tar": 12})
    cfg = load_config(DEMO_CONFIG, [f"data.train_shards={shards}", f"paths.output_dir={tmp_path}/out",
                                    "data.val_images=null", "data.val_annotations=null"])
    report = run_preflight(cfg, Plan(), world_size=2)
    assert report.problems == [], report.table()
    names = {c.name for c in report.checks}
    assert {"config", "data.train_shards", "data.train_shards shards", "data.train_shards categories",
            "paths.output_dir", "deepspeed", "resume"} <= names, report.table()


def test_every_planted_problem_is_found_in_one_run(tmp_path: Path) -> None:
    shards = plant_shards(tmp_path / "shards", [1, 2, 400], {"shard-000000.tar": 10},
                          {"shard-000000.tar": 11, "shard-000001.tar": 12})
    cfg = load_config(DEMO_CONFIG, [
        f"data.train_shards={shards}", f"data.val_images={tmp_path}/val/images",
        f"data.val_annotations={tmp_path}/val/annotations.json",
        f"model.backbone.pretrained_path={tmp_path}/backbone.pth",
        f"train.pretrained_categories={tmp_path}/categories.json",
        f"paths.output_dir={tmp_path}/a-file/out", "deepspeed.extra={train_batch_size: 7}",
    ])
    (tmp_path / "a-file").write_text("not a directory")
    weights = tmp_path / "other_model.safetensors"
    save_weights({"backbone.stem.weight": torch.zeros(3, 3)}, weights)
    report = run_preflight(cfg, Plan(weights=str(weights), resume=True), world_size=2)
    problems = "\n".join(report.problems)
    expected = {
        "shards": "2 shards in the manifest, 1 missing (shard-000001.tar): re-run",
        "categories": "category ids go up to 400 but model.num_classes=",
        "val annotations": f"data.val_annotations: annotations {tmp_path}/val/annotations.json does not exist",
        "val images": f"data.val_images: images {tmp_path}/val/images does not exist",
        "backbone": "model.backbone.pretrained_path: backbone weights",
        "categories file": "train.pretrained_categories: categories",
        "weights": "does not fit this config's model: missing",
        "resume": "resume: no complete checkpoint under",
        "output": "paths.output_dir: ",
        "deepspeed": "deepspeed.extra sets train_batch_size=7",
    }
    for what, text in expected.items():
        assert text in problems, f"{what}: {text!r} not found in\n{report.table()}"
    assert len(report.problems) == len(expected), report.table()
    # a damaged (resized) shard is a warning: the loader skips and counts its bad samples
    (warning,) = [c for c in report.checks if c.status == "warn" and c.name == "data.train_shards shard sizes"]
    assert warning.detail.startswith("1 of 2 shards differ in size from the manifest (shard-000000.tar)"), warning


def test_checkpoints_that_fit_and_class_rows(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CONFIG, ["data.val_images=null", "data.val_annotations=null"])
    state = {k: torch.zeros(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_weights(state, good)
    strict = Plan(train=False, weights=str(good), weights_key="--checkpoint", transfer=False)
    assert run_preflight(cfg, strict).problems == []
    other = load_config(DEMO_CONFIG, [f"model.num_classes={cfg.model.num_classes + 5}"])
    (problem,) = run_preflight(other, strict).problems
    assert f"class rows, the config's model.num_classes={cfg.model.num_classes + 5}" in problem
    transfer = run_preflight(other, Plan(train=False, weights=str(good)))
    assert transfer.problems == [] and any(c.status == "warn" for c in transfer.checks), transfer.table()


def test_s3_credentials_and_endpoint(s3_bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = s3_bucket.fs()
    fs.pipe(f"{s3_bucket.name}/val/annotations.json", b"{}")
    fs.pipe(f"{s3_bucket.name}/val/images/1.jpg", b"x")
    overrides = [f"data.val_images={s3_bucket.url}/val/images", f"data.val_annotations={s3_bucket.url}/val/ann.json"]
    plan = Plan(train=False, require_val=True)

    def problems(options: dict) -> list[str]:
        cfg = load_config(DEMO_CONFIG, overrides)
        cfg.data.storage_options = options
        return run_preflight(cfg, plan).problems

    assert problems(s3_bucket.storage_options) == [f"data.val_annotations: annotations {s3_bucket.url}/val/ann.json "
                                                   "does not exist"]
    no_credentials(monkeypatch)
    (line,) = problems({"endpoint_url": s3_bucket.endpoint})
    assert line.startswith(f"{s3_bucket.url}: no S3 credentials found: set AWS_ACCESS_KEY_ID"), line
    assert "needed by data.val_" in line
    dead = f"http://127.0.0.1:{free_port()}"
    (line,) = problems({**s3_bucket.storage_options, "endpoint_url": dead})
    assert "cannot reach the S3 endpoint: check AWS_ENDPOINT_URL" in line and dead in line, line


# ---------------------------------------------------------------------------------------
# one-line errors of every command (in-process, through run_command as __main__ does)
# ---------------------------------------------------------------------------------------


def test_training_commands_bad_inputs(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    no_credentials(monkeypatch)
    monkeypatch.chdir(REPO)
    pretrain = "launch/pretrain_o365.py"
    # the README's command, no credentials, and a shard directory that does not exist
    code = run_command(pretrain_o365.main, pretrain, ["--config", "configs/pretrain_o365_swinl.yaml",
                                                     "data.train_shards=/nonexistent/shards",
                                                     f"paths.output_dir={tmp_path}/out"])
    one_liner(capsys, code, "data.train_shards: shard directory /nonexistent/shards does not exist",
              "s3://dino-data: no S3 credentials found")
    # a bad config value, a missing config file, a missing pretrained file, wrong-format weights
    code = run_command(pretrain_o365.main, pretrain, ["--config", DEMO_CONFIG, "optim.lr=fast"])
    one_liner(capsys, code, "config key 'optim.lr' (from the command line) must be a number")
    code = run_command(pretrain_o365.main, pretrain, ["--config", "configs/nonexistent.yaml"])
    one_liner(capsys, code, "config file not found")
    shards = plant_shards(tmp_path / "shards", [1], {"s.tar": 1}, {"s.tar": 1})
    common = ["--config", "configs/demo/finetune.yaml", f"data.train_shards={shards}",
              f"paths.output_dir={tmp_path}/out", "data.val_images=null", "data.val_annotations=null"]
    code = run_command(finetune_coco.main, "launch/finetune_coco.py", [*common, "--pretrained", "/nonexistent.pth"])
    one_liner(capsys, code, "train.pretrained: weights /nonexistent.pth does not exist")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    code = run_command(finetune_coco.main, "launch/finetune_coco.py",
                       [*common, "--pretrained", str(tmp_path / "garbage.pth")])
    one_liner(capsys, code, "cannot be read as a torch checkpoint")


def test_evaluation_inference_and_conversion_bad_inputs(tmp_path: Path, capsys) -> None:
    cfg = load_config(DEMO_CONFIG)
    weights = tmp_path / "w.safetensors"
    save_weights({k: torch.zeros(v.shape) for k, v in meta_model(cfg).state_dict().items()}, weights)
    code = run_command(evaluate_script.main, "launch/evaluate.py",
                       ["--config", DEMO_CONFIG, "--checkpoint", str(weights), "data.val_images=null"])
    one_liner(capsys, code, "set data.val_images and data.val_annotations")
    (tmp_path / "notes.png").write_text("not an image")
    code = run_command(infer_script.main, "launch/infer.py", [str(tmp_path / "notes.png"), "--config", DEMO_CONFIG,
                                                             "--checkpoint", str(weights), "--out", "x.png"])
    one_liner(capsys, code, f"image: {tmp_path}/notes.png is not a readable image")
    assert checkpoint_convert.main(["official-to-ours", "/nonexistent.pth", str(tmp_path / "o")]) == 2
    one_liner(capsys, 2, "checkpoint not found: /nonexistent.pth")


def test_build_shards_bad_inputs(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = "python -m data_pipeline.build_shards"
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "ann.csv").write_text("id,file\n1,a.jpg\n")

    def run(*args: str) -> int:
        return run_command(build_shards.main, prog, ["--output", str(tmp_path / "out"), *args])

    one_liner(capsys, run("--annotations", str(tmp_path / "ann.csv"), "--images", str(tmp_path / "nope")),
              "--annotations: " + str(tmp_path / "ann.csv") + " is not a JSON object",
              f"--images: image root {tmp_path}/nope does not exist")
    no_credentials(monkeypatch)
    one_liner(capsys, run("--annotations", "s3://dino-data/ann.json", "--images", str(images)),
              "s3://dino-data: no S3 credentials found")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    one_liner(capsys, run("--annotations", "s3://dino-data/ann.json", "--images", str(images),
                          "--endpoint-url", dead), "cannot reach the S3 endpoint", dead)


def test_debug_keeps_the_traceback(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--config", "configs/nonexistent.yaml"]
    with pytest.raises(ValueError, match="config file not found"):
        run_command(pretrain_o365.main, "launch/pretrain_o365.py", [*argv, "--debug"])
    monkeypatch.setenv("DINO_DEBUG", "1")
    with pytest.raises(ValueError, match="config file not found"):
        run_command(pretrain_o365.main, "launch/pretrain_o365.py", argv)
    monkeypatch.delenv("DINO_DEBUG")
    monkeypatch.setenv("RANK", "1")  # under a launcher, before the process group exists, only rank 0 prints
    # (earlier in-process tests may have left a group of one in this process)
    monkeypatch.setattr(errors, "_process_group_exists", lambda: False)
    setup_logging()
    assert run_command(pretrain_o365.main, "launch/pretrain_o365.py", argv) == 2
    assert capsys.readouterr().err == ""
    assert user_message(RuntimeError("a bug")) is None


# ---------------------------------------------------------------------------------------
# real processes
# ---------------------------------------------------------------------------------------


def run_process(cmd: list[str], extra_env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    e = env()
    for key, value in (extra_env or {}).items():
        if value is None:
            e.pop(key, None)
        else:
            e[key] = value
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


def test_readme_pretrain_command_under_the_launcher(tmp_path: Path) -> None:
    """2 ranks, no credentials, a shard directory that does not exist: rank 0's preflight
    names both in one line each, printed once; the launcher stops rank 1."""
    proc = run_process([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain_o365.py",
                        "--config", "configs/pretrain_o365_swinl.yaml", "data.train_shards=/nonexistent/shards",
                        f"paths.output_dir={tmp_path}/out"], {**NO_CREDENTIALS, "DS_ACCELERATOR": "cpu"})
    lines = [line for line in error_lines(proc) if line.startswith("launch/pretrain_o365.py: error: ")]
    # A Swin-L checkpoint needs ~3.2 GiB: on a machine with less free under /tmp the preflight
    # rightly names paths.output_dir too. That line depends on the machine, not on this test.
    lines = [line for line in lines if not ("paths.output_dir" in line and " free, one checkpoint " in line)]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert any("/nonexistent/shards does not exist" in line for line in lines)
    assert any("s3://dino-data: no S3 credentials found" in line for line in lines)


def test_readme_commands_as_processes(tmp_path: Path) -> None:
    proc = run_process([sys.executable, "-m", "data_pipeline.build_shards", "--annotations", "/nonexistent.json",
                        "--images", str(tmp_path), "--output", str(tmp_path / "out")])
    (line,) = error_lines(proc)
    assert line == ("python -m data_pipeline.build_shards: error: --annotations: annotation file /nonexistent.json "
                    "does not exist (nearest existing parent: /)")
    proc = run_process([sys.executable, "-m", "dino_scale.preflight", "--config", DEMO_CONFIG,
                        "model.num_classes=two"])
    (line,) = error_lines(proc)
    assert "config key 'model.num_classes' (from the command line) must be an integer" in line
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    proc = run_process([sys.executable, "launch/infer.py", str(image), "--config", DEMO_CONFIG,
                        "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o.png")])
    (line,) = error_lines(proc)
    assert f"--checkpoint: weights {tmp_path}/missing.safetensors does not exist" in line
    assert os.path.exists(image)


def test_a_resume_checkpoint_of_another_model_or_global_batch_is_named(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = load_config(DEMO_CONFIG, cfg_overrides(out))
    step = out / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (step / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 2, "zero_stage": 2}))
    saved = json.loads(json.dumps(config_to_dict(cfg)))
    (step / "config.json").write_text(json.dumps(saved))

    def resume_line(config, world_size: int) -> str:
        report = run_preflight(config, Plan(resume=True), world_size=world_size)
        return next(line for line in report.problems + report.table().splitlines() if "step_10" in line)

    assert "written by 2 ranks, this run has 1" in resume_line(
        load_config(DEMO_CONFIG, [*cfg_overrides(out), "deepspeed.gradient_accumulation_steps=2"]), 1)
    assert "global batch of 8 (2 ranks); this run's is 4" in resume_line(cfg, 1)
    saved["model"]["num_queries"] += 1
    (step / "config.json").write_text(json.dumps(saved))
    assert "model.num_queries: checkpoint" in resume_line(cfg, 2)


def cfg_overrides(out: Path) -> list[str]:
    return ["data.val_images=null", "data.val_annotations=null", f"paths.output_dir={out}"]
