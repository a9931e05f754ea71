"""The CPU-side parts of benchmarks/gpu_acceptance.py: arguments, the JSON report, step
failures and time limits, and the Swin-L training step run on the CPU at a small size."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.models import build_dino
from launch_helpers import SMALL_SWIN

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


acceptance = load_script()


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_defaults_run_every_step_within_eight_minutes():
    args = acceptance.parse_args([])
    assert args.steps == list(acceptance.DEFAULT_STEPS) == [s for s in acceptance.STEPS if s != "memory"]
    assert args.deadline <= 480
    assert args.swinl_hw == (800, 1333)
    assert (args.swinl_precision, args.swinl_zero, args.swinl_device) == ("bf16", 2, "cuda")
    assert all(v in acceptance.VARIANTS for v in args.swinl_variants)


def test_steps_run_in_the_fixed_order_whatever_the_order_given():
    assert acceptance.parse_args(["--steps", "swinl,env"]).steps == ["env", "swinl"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "env,bogus"], "unknown step(s) ['bogus']"),
    (["--swinl-size", "800"], "--swinl-size must be HxW"),
    (["--swinl-size", "16x16"], "at least 32x32"),
    (["--swinl-variants", "7scale"], "unknown variant(s) ['7scale']"),
    (["--deadline", "0"], "--deadline must be positive"),
    (["--swinl-images", "0"], "--swinl-images must be >= 1"),
])
def test_bad_arguments_end_with_a_usage_error_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        acceptance.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_report_is_rewritten_after_each_step_and_names_the_first_failure(tmp_path):
    report = acceptance.Report(tmp_path / "sub" / "report.json")
    report.record("env", {"status": "passed", "seconds": 1.0, "gpu": "X"})
    on_disk = json.loads(report.path.read_text())
    assert on_disk["passed"] is True and on_disk["failed_step"] is None
    assert on_disk["steps"]["env"]["gpu"] == "X"
    report.record("build", {"status": "failed", "seconds": 2.0, "error": "nvcc exploded"})
    report.record("tests", {"status": "skipped", "seconds": 0.0, "error": "step build failed"})
    on_disk = json.loads(report.path.read_text())
    assert on_disk["passed"] is False and on_disk["failed_step"] == "build"
    assert list(on_disk["steps"]) == ["env", "build", "tests"]
    assert not list(report.path.parent.glob(".*tmp"))  # no temp file left beside it


def test_a_step_that_overruns_its_limit_is_killed_with_everything_it_started():
    started = time.monotonic()
    code, _ = acceptance.run_subprocess(["bash", "-c", "sleep 60 & sleep 60"], limit=1.0)
    assert code is None
    assert time.monotonic() - started < 10


def test_steps_run_as_a_world_of_their_own(monkeypatch):
    # a caller inside a process group (the test process after in-process training) must not
    # hand its rendezvous to a step: the step would try to listen on the caller's port
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "0")
    code, out = acceptance.run_subprocess(["bash", "-c", "echo port=${MASTER_PORT:-none} rank=${RANK:-none}"],
                                          limit=30)
    assert code == 0 and out.strip() == "port=none rank=none"


def test_a_child_result_is_read_from_its_last_result_line():
    out = f"noise\n{acceptance.RESULT_PREFIX}{{\"a\": 1}}\nmore noise\n{acceptance.RESULT_PREFIX}{{\"a\": 2}}\n"
    assert acceptance.child_result(out) == {"a": 2}
    assert acceptance.child_result("no result here") is None


def test_junit_counts_read_pytest_totals(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="13" failures="1" errors="0" '
                   'skipped="2"></testsuite></testsuites>')
    assert acceptance.junit_counts(xml) == {"tests": 13, "failures": 1, "errors": 0, "skipped": 2, "passed": 10}
    assert acceptance.junit_counts(tmp_path / "absent.xml") == {}


def test_the_gpu_test_step_collects_only_modules_with_gpu_tests():
    files = acceptance.gpu_test_files()
    assert "tests/test_msda.py" in files
    assert all(acceptance.GPU_MARK.search((REPO / f).read_text()) for f in files)
    assert "tests/test_gpu_acceptance.py" not in files


def test_synthetic_batch_looks_like_a_loader_batch():
    batch = acceptance.synthetic_batch(2, 40, 56, num_classes=5, boxes_per_image=3)
    assert batch.images.shape == (2, 3, 40, 56) and batch.masks.shape == (2, 40, 56)
    assert not batch.masks.any()
    for target in batch.targets:
        assert target["boxes"].shape == (3, 4) and target["labels"].dtype == torch.int64
        assert ((target["labels"] >= 1) & (target["labels"] < 5)).all()
        cx, cy, w, h = target["boxes"].unbind(1)
        assert ((cx - w / 2) > 0).all() and ((cx + w / 2) < 1).all()
        assert ((cy - h / 2) > 0).all() and ((cy + h / 2) < 1).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_without_a_gpu_the_run_fails_at_the_env_step_and_skips_the_rest(tmp_path):
    out = tmp_path / "report.json"
    result = run_script("--steps", "env,build,tests", "--out", str(out), "--deadline", "120")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        "GPU acceptance FAILED at step env: torch sees no CUDA device")
    report = json.loads(out.read_text())
    assert report["failed_step"] == "env"
    assert report["steps"]["env"]["torch"] == torch.__version__
    assert [report["steps"][s]["status"] for s in ("build", "tests")] == ["skipped", "skipped"]
    assert report["steps"]["build"]["error"] == "step env failed"


def test_a_deadline_too_short_for_a_step_skips_it_and_fails_the_run(tmp_path):
    out = tmp_path / "report.json"
    result = run_script("--steps", "msda", "--out", str(out), "--deadline", "3")
    assert result.returncode == 1
    report = json.loads(out.read_text())
    assert report["steps"]["msda"]["status"] == "skipped"
    assert "s left" in report["steps"]["msda"]["error"]




@pytest.mark.slow
def test_the_swin_l_training_step_runs_on_the_cpu_at_a_small_size(tmp_path):
    # The Swin-L config's layout at a small width (its full-size parameter count is checked by
    # tests/test_checkpoint_convert.py): the step's plumbing, not its speed, is under test here.
    out = tmp_path / "report.json"
    result = run_script("--steps", "swinl", "--swinl-device", "cpu", "--swinl-size", "64x96",
                        "--swinl-images", "1", "--swinl-warmup", "0", "--swinl-steps", "1",
                        "--swinl-precision", "fp32", "--swinl-variants", "", "--out", str(out),
                        "--deadline", "400", *SMALL_SWIN, timeout=450)
    assert result.returncode == 0, result.stdout + result.stderr
    swinl = json.loads(out.read_text())["steps"]["swinl"]
    assert swinl["status"] == "passed", swinl
    assert swinl["device"] == "cpu" and swinl["image_hw"] == [64, 96]
    assert swinl["num_feature_levels"] == 4 and swinl["backbone_checkpointing"] is True
    cfg = load_config(REPO / "configs" / "pretrain_o365_swinl.yaml", SMALL_SWIN)
    assert swinl["parameters"] == sum(p.numel() for p in build_dino(cfg.model).parameters())
    assert len(swinl["losses"]) == 1 and all(map(math.isfinite, swinl["losses"]))
    assert swinl["seconds_per_step"] > 0 and swinl["images_per_second"] > 0
    assert set(swinl["phase_seconds"]) == {"forward", "loss", "backward", "step"}
    assert swinl["peak_rss_gib"] > 0


@pytest.mark.slow
def test_the_memory_step_records_each_measured_row(tmp_path):
    out = tmp_path / "report.json"
    result = run_script("--steps", "memory", "--swinl-device", "cpu", "--swinl-size", "64x96", "--out", str(out),
                        "--memory-args", "--models 5scale --images 1 --precisions fp32 --combinations none,backbone "
                                         "--repeats 1", "--deadline", "300", *SMALL_SWIN, timeout=350)
    assert result.returncode == 0, result.stdout + result.stderr
    memory = json.loads(out.read_text())["steps"]["memory"]
    assert memory["status"] == "passed", memory
    assert [(r["model"], r["checkpointing"]) for r in memory["rows"]] == [("5scale", "none"), ("5scale", "backbone")]
    assert all(not r["out_of_memory"] and r["activation_gib"] > 0 for r in memory["rows"])
    assert "2 measurements (0 out of memory)" in result.stdout
    # the 64x96 model fits 24 GB whatever is checkpointed: the pick is the faster row within 1.25x
    assert memory["goal"] and memory["goal"][0].startswith("5scale fp32 1 img, under 24 GB within 1.25x of none: ")
    assert "goal: 5scale fp32 1 img" in result.stdout


def load_memory_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_memory_benchmark_counts_less_saved_activation_with_more_checkpointing(tmp_path):
    memory = load_memory_benchmark()
    # Swin-L's layout at a small width, so that the CPU count runs in seconds
    argv = ["--device", "cpu", "--size", "64x96", "--images", "1", "--precisions", "fp32", "--models", "5scale",
            "--combinations", "none,backbone+encoder+decoder", "--repeats", "1",
            "--json", str(tmp_path / "m.json"), "--write", str(tmp_path / "m.md"),
            "model.num_queries=30", "model.dn_number=4",
            "model.backbone.timm_kwargs={embed_dim: 16, depths: [2, 2, 2, 2], num_heads: [1, 2, 4, 8]}"]
    assert memory.main(argv) == 0
    rows = {r["checkpointing"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    none, everything = rows["none"], rows["backbone+encoder+decoder"]
    assert 0 < everything["activation_gib"] < 0.5 * none["activation_gib"]
    assert none["time_ratio"] == 1.0 and everything["model_state_gib"] == none["model_state_gib"]
    assert none["model_state_gib"] * 2**30 == 16 * none["parameters"]
    table = (tmp_path / "m.md").read_text()
    assert "| 5scale | fp32 | 1 | backbone+encoder+decoder |" in table
    # a count that drops what it counts (the full-size CPU mode) counts the same bytes
    assert memory.main([*argv, "--count-only", "--json", str(tmp_path / "c.json")]) == 0
    counted = {r["checkpointing"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert {k: r["activation_gib"] for k, r in counted.items()} == {k: r["activation_gib"] for k, r in rows.items()}
    assert counted["none"]["seconds"] is None and counted["none"]["time_ratio"] is None


@pytest.mark.parametrize("keep", [True, False])
def test_the_saved_bytes_count_leaves_out_parameters_and_counts_each_storage_once(keep):
    memory = load_memory_benchmark()
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    counter = memory.SavedBytes(layer, keep=keep)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        hidden = layer(x)  # saves x and a view of the weight (a parameter: left out)
        out = (hidden * hidden[:, :1]).sum()  # saves `hidden` twice (itself and a view): one storage
    assert counter.total == x.nbytes + hidden.nbytes
    if keep:
        out.backward()
        assert x.grad is not None


def test_a_row_that_runs_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    memory = load_memory_benchmark()
    measure = memory.measure

    def measure_or_oom(model, *args, **kwargs):
        if not model.backbone.grad_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(memory, "measure", measure_or_oom)
    argv = ["--device", "cpu", "--size", "64x96", "--images", "1", "--precisions", "fp32", "--models", "4scale",
            "--combinations", "none,backbone", "--repeats", "1", "--json", str(tmp_path / "m.json"),
            "--write", str(tmp_path / "m.md"), *SMALL_SWIN]
    assert memory.main(argv) == 0
    none, backbone = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert none["out_of_memory"] and none["activation_gib"] is None
    assert not backbone["out_of_memory"] and backbone["activation_gib"] > 0 and backbone["time_ratio"] is None
    assert "| 4scale | fp32 | 1 | none | out of memory | | | |" in (tmp_path / "m.md").read_text()


def _row(combination: str, total_gib: float | None, seconds: float | None, ratio: float | None) -> dict:
    return {"model": "5scale", "precision": "bf16", "images": 2, "checkpointing": combination,
            "out_of_memory": total_gib is None, "activation_gib": total_gib and total_gib - 4.0,
            "total_gib": total_gib, "seconds": seconds, "time_ratio": ratio}


def test_the_memory_goal_picks_the_fastest_combination_under_budget_and_slowdown():
    memory = load_memory_benchmark()
    rows = [_row("none", 24.9, 0.490, 1.0), _row("backbone", 17.1, 0.550, 1.12),
            _row("encoder", 19.0, 0.540, 1.10), _row("backbone+encoder", 9.0, 0.700, 1.43)]
    # none is 26.7e9 bytes: over 24 GB; backbone+encoder fits but is 1.43x
    (line,) = memory.goal_picks(rows, budget_gb=24, max_slowdown=1.25)
    assert line.startswith("5scale bf16 2 img, under 24 GB within 1.25x of none: encoder (") and "also backbone" in line
    (line,) = memory.goal_picks(rows, budget_gb=12, max_slowdown=1.25)
    assert line.endswith(": no combination")
    (line,) = memory.goal_picks(rows, budget_gb=8, max_slowdown=1.25)
    assert line == "5scale bf16 2 img: nothing fits 8 GB"
    # GiB against GB: 22.5 GiB is 24.2e9 bytes, over a 24 GB budget
    assert memory.goal_picks([_row("none", 22.5, 0.49, 1.0)], 24, 1.25) == ["5scale bf16 2 img: nothing fits 24 GB"]


def test_without_step_times_the_memory_goal_judges_memory_alone():
    memory = load_memory_benchmark()
    counted = [_row("none", 40.4, None, None), _row("backbone+encoder", 8.9, None, None),
               _row("backbone", 21.0, None, None)]
    (line,) = memory.goal_picks(counted, budget_gb=24, max_slowdown=1.25)
    assert line.startswith("5scale bf16 2 img, under 24 GB (no time ratio to none: memory only): backbone (")
    assert line.endswith("; also backbone+encoder")


def test_the_memory_benchmark_refuses_unknown_names():
    memory = load_memory_benchmark()
    with pytest.raises(SystemExit):
        memory.parse_args(["--combinations", "everything"])
