"""GPU acceptance: one unattended run that says whether a GPU machine trains dino-scale.

    python benchmarks/gpu_acceptance.py [--out outputs/gpu_acceptance.json] [--deadline 480]
    make gpu-check                      # the same, with the project's .venv

Steps, in order, each in a subprocess of its own with a time limit (what is left of
--deadline, capped per step), so that a crash or a hang names its step and the run still
ends within the deadline:

  env     torch, CUDA and GPU facts (name, capability, memory, driver)
  build   compiles the native op in place for this GPU only (TORCH_CUDA_ARCH_LIST = its
          capability, DINO_SCALE_BUILD_CUDA=1) and checks that the CUDA kernel is registered
  tests   the `gpu`-marked tests (CUDA op vs the CPU op, gradcheck and opcheck on device)
  msda    the CUDA op against the grid_sample reference at the DINO encoder and decoder
          shapes, fwd and fwd+bwd, value in float32 and bfloat16 (benchmarks/msda.py)
  swinl   training steps of the Swin-L 4-scale DINO at 1333x800 (bf16, ZeRO-2, one process,
          the real trainer set-up: DeepSpeed engine, parameter groups, criterion with
          denoising): seconds per step, images/s, peak GPU memory; then, while time is left,
          the variants of --swinl-variants (5 scales, no backbone checkpointing, ...)
  memory  only when named in --steps: benchmarks/memory.py over every activation-
          checkpointing combination (4/5 scales, 1/2 images, fp32/bf16): peak memory and
          step time against none; a row that does not fit the GPU is recorded as such

    python benchmarks/gpu_acceptance.py --steps env,build,tests,msda,swinl,memory --deadline 570

Every figure goes into one JSON file, rewritten atomically after each step, so what ran is
kept even if the machine is taken away. The exit status is 0 when every step passed, 1
otherwise; the last line names the first step that failed and why. A step the deadline left
no time for is `skipped`, which also fails the run. Steps can be chosen with --steps
(e.g. `--steps swinl --swinl-device cpu` runs the Swin-L step on the CPU, as the tests do
at a small size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from dino_scale.io import atomic_write_text  # noqa: E402

STEPS = ("env", "build", "tests", "msda", "swinl", "memory")
# `memory` (benchmarks/memory.py's whole checkpointing matrix) runs only when asked for
DEFAULT_STEPS = STEPS[:-1]
# Longest each step may take, in seconds (less when the deadline is nearer).
STEP_LIMITS = {"env": 60, "build": 300, "tests": 180, "msda": 150, "swinl": 240, "memory": 420}
# A variant starts only if at least this many seconds are left before the deadline.
MIN_VARIANT_SECONDS = 60
RESULT_PREFIX = "ACCEPTANCE_RESULT "
# torch.distributed rendezvous variables: each step's process is a world of one
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# a `@pytest.mark.gpu` decorator, or a module-wide `pytestmark = ... pytest.mark.gpu ...`
GPU_MARK = re.compile(r"^(\s*@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)
# Named Swin-L variants: config overrides on top of configs/pretrain_o365_swinl.yaml.
VARIANTS: dict[str, list[str]] = {
    "4scale": [],
    "4scale-no-ckpt": ["model.backbone.grad_checkpointing=false"],
    "5scale": ["model.num_feature_levels=5", "model.backbone.return_stages=[0,1,2,3]"],
    "5scale-no-ckpt": ["model.num_feature_levels=5", "model.backbone.return_stages=[0,1,2,3]",
                       "model.backbone.grad_checkpointing=false"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_acceptance.json"),
                   help="the JSON report (rewritten after each step)")
    p.add_argument("--deadline", type=float, default=480.0,
                   help="seconds the whole run may take; steps are stopped to keep it")
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                   help=f"comma-separated steps to run, in the fixed order {','.join(STEPS)} "
                        f"(default: all but memory)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the step subprocesses")
    p.add_argument("--swinl-device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--swinl-size", default="800x1333", help="image HxW of the Swin-L steps")
    p.add_argument("--swinl-images", type=int, default=2, help="images per step (one process)")
    p.add_argument("--swinl-steps", type=int, default=5, help="timed steps after the warm-up")
    p.add_argument("--swinl-warmup", type=int, default=2)
    p.add_argument("--swinl-precision", choices=["bf16", "fp32", "fp16"], default="bf16")
    p.add_argument("--swinl-zero", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--swinl-variants", default="5scale,4scale-no-ckpt,5scale-no-ckpt",
                   help=f"extra variants after the 4-scale run, while time is left ({', '.join(VARIANTS)}); "
                        "'' for none")
    p.add_argument("--memory-args", default="--repeats 2",
                   help="arguments of benchmarks/memory.py for the memory step (its device, size and JSON file, "
                        "and the overrides, come from this run)")
    p.add_argument("--child", choices=["env", "verify-build", "swinl"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="4scale", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides for the Swin-L steps, applied last")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments; bad values end the run with a one-line usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown step(s) {unknown}; choose from {','.join(STEPS)}")
    args.steps = [s for s in STEPS if s in steps]
    try:
        height, width = (int(v) for v in args.swinl_size.lower().split("x"))
    except ValueError:
        parser.error(f"--swinl-size must be HxW, e.g. 800x1333, got {args.swinl_size!r}")
    if height < 32 or width < 32:
        parser.error(f"--swinl-size must be at least 32x32, got {args.swinl_size!r}")
    args.swinl_hw = (height, width)
    variants = [v for v in args.swinl_variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"--swinl-variants: unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    args.swinl_variants = variants
    if args.deadline <= 0:
        parser.error("--deadline must be positive")
    for name in ("swinl_images", "swinl_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.swinl_warmup < 0:
        parser.error("--swinl-warmup must be >= 0")
    return args


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ran, with its figures; `save` rewrites the JSON file atomically."""

    path: Path
    started: float = field(default_factory=time.time)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed_step(self) -> str | None:
        return next((name for name, s in self.steps.items() if s["status"] != "passed"), None)

    def as_dict(self) -> dict[str, Any]:
        failed = self.failed_step
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "host": platform.node(),
            "passed": failed is None and bool(self.steps),
            "failed_step": failed,
            "steps": self.steps,
        }

    def record(self, name: str, result: dict[str, Any]) -> None:
        self.steps[name] = result
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.as_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# running a step
# ---------------------------------------------------------------------------------------


def run_subprocess(cmd: list[str], limit: float, env: dict[str, str] | None = None,
                   cwd: Path = REPO) -> tuple[int | None, str]:
    """(exit status or None on timeout, combined output). The child runs in the checkout
    (on PYTHONPATH, installed or not) in its own process group, so that a timeout kills
    everything it started, as a world of its own (no rendezvous variables of this process)."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in RENDEZVOUS_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return None, out


def child_result(output: str) -> dict[str, Any] | None:
    """The JSON a child printed after RESULT_PREFIX (its last such line)."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def failure(status: str, seconds: float, error: str, output: str = "") -> dict[str, Any]:
    result = {"status": status, "seconds": round(seconds, 1), "error": error}
    if output:
        result["output_tail"] = tail(output)
    return result


def run_child(args: argparse.Namespace, child: str, limit: float, extra: list[str] = (),
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs this script as `--child child` and returns its result dict with a status."""
    cmd = [args.python, str(Path(__file__).resolve()), "--child", child, *extra]
    started = time.perf_counter()
    code, out = run_subprocess(cmd, limit, env=env)
    seconds = time.perf_counter() - started
    if code is None:
        return failure("timeout", seconds, f"no result within {limit:.0f} s", out)
    result = child_result(out)
    if code != 0 or result is None:
        last = tail(out, 1) or "no output"
        return failure("failed", seconds, f"exit status {code}: {last}", out)
    return {"status": "passed", "seconds": round(seconds, 1), **result}


def step_env(args: argparse.Namespace, limit: float) -> dict[str, Any]:
    result = run_child(args, "env", limit)
    if result["status"] == "passed" and not result.get("cuda_available"):
        result.update(status="failed", error="torch sees no CUDA device")
    return result


def gpu_arch(report: Report) -> str | None:
    env = report.steps.get("env", {})
    capability = env.get("capability")
    return f"{capability[0]}.{capability[1]}" if capability else None


def step_build(args: argparse.Namespace, limit: float, report: Report) -> dict[str, Any]:
    """`setup.py build_ext --inplace` for this GPU; if that fails (an old setuptools, say),
    the op's own JIT build of the same sources, which later steps then load from its cache."""
    env = dict(os.environ, DINO_SCALE_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
    arch = gpu_arch(report)
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    started = time.perf_counter()
    cmd = [args.python, "setup.py", "build_ext", "--inplace"]
    code, out = run_subprocess(cmd, limit, env=env)
    build_seconds = time.perf_counter() - started
    expected = "installed"
    setup_error = None
    if code != 0:
        setup_error = f"`{shlex.join(cmd)}` {'timed out' if code is None else f'exit status {code}'}: {tail(out, 1)}"
        expected = "jit"
    left = limit - (time.perf_counter() - started)
    if left < 10:
        return failure("failed", build_seconds, setup_error or "no time left to check the build", out)
    verify = run_child(args, "verify-build", left,
                       env=dict(env, DINO_SCALE_MSDA_JIT="0" if expected == "installed" else "1"))
    verify.update(seconds=round(time.perf_counter() - started, 1), arch_list=env.get("TORCH_CUDA_ARCH_LIST"),
                  setup_build_seconds=round(build_seconds, 1))
    if setup_error:
        verify["setup_error"] = setup_error
        verify["setup_output_tail"] = tail(out)
    if verify["status"] == "passed" and not (verify.get("native") == expected and verify.get("cuda_kernel")):
        verify.update(status="failed", error=f"op loaded as {verify.get('native')!r} (expected {expected!r}), "
                                             f"CUDA kernel {verify.get('cuda_kernel')}; {setup_error or ''}")
    return verify


def gpu_test_files() -> list[str]:
    """The test modules that hold `gpu`-marked tests (collecting only these keeps the step
    free of the other tests' dependencies: S3 servers, Ray, Kubernetes schemas)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if GPU_MARK.search(p.read_text()))


def step_tests(args: argparse.Namespace, limit: float) -> dict[str, Any]:
    junit = Path(tempfile.mkdtemp(prefix="dino_gpu_tests_")) / "junit.xml"
    cmd = [args.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *gpu_test_files()]
    started = time.perf_counter()
    code, out = run_subprocess(cmd, limit)
    seconds = time.perf_counter() - started
    counts = junit_counts(junit)
    result = {"seconds": round(seconds, 1), **counts}
    if code is None:
        return {**failure("timeout", seconds, f"pytest did not finish within {limit:.0f} s", out), **counts}
    if code != 0 or counts.get("failures", 0) or counts.get("errors", 0) or not counts.get("passed"):
        return {**failure("failed", seconds, f"pytest exit status {code}: {tail(out, 1)}", out), **counts}
    return {"status": "passed", **result}


def junit_counts(path: Path) -> dict[str, int]:
    """tests/failures/errors/skipped/passed from a pytest junit XML file ({} if absent)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_msda(args: argparse.Namespace, limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "passed"}
    tmp = Path(tempfile.mkdtemp(prefix="dino_gpu_msda_"))
    for dtype in ("float32", "bfloat16"):
        left = limit - (time.perf_counter() - started)
        out_json = tmp / f"{dtype}.json"
        cmd = [args.python, "benchmarks/msda.py", "--device", "cuda", "--dtype", dtype,
               "--repeats", "21", "--json", str(out_json)]
        code, out = run_subprocess(cmd, left)
        if code != 0 or not out_json.is_file():
            why = "timed out" if code is None else f"exit status {code}"
            return failure("timeout" if code is None else "failed", time.perf_counter() - started,
                           f"benchmarks/msda.py --dtype {dtype} {why}: {tail(out, 1)}", out)
        result[dtype] = json.loads(out_json.read_text())
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def step_swinl(args: argparse.Namespace, limit: float, deadline: float) -> dict[str, Any]:
    """The 4-scale run decides the step; each variant runs while time is left."""
    common = ["--swinl-device", args.swinl_device, "--swinl-size", args.swinl_size,
              "--swinl-images", str(args.swinl_images), "--swinl-steps", str(args.swinl_steps),
              "--swinl-warmup", str(args.swinl_warmup), "--swinl-precision", args.swinl_precision,
              "--swinl-zero", str(args.swinl_zero), *args.overrides]
    started = time.perf_counter()
    main = run_child(args, "swinl", limit, ["--variant", "4scale", *common])
    result = dict(main)
    result["variants"] = {}
    if main["status"] != "passed":
        return result
    for variant in args.swinl_variants:
        left = deadline - time.monotonic()
        if left < MIN_VARIANT_SECONDS:
            result["variants"][variant] = {"status": "skipped", "error": f"only {left:.0f} s left"}
            continue
        result["variants"][variant] = run_child(args, "swinl", min(limit, left - 5), ["--variant", variant, *common])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def step_memory(args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """benchmarks/memory.py: peak memory and step time of every activation-checkpointing
    combination; the rows measured before a timeout are kept."""
    out_json = Path(tempfile.mkdtemp(prefix="dino_gpu_memory_")) / "memory.json"
    cmd = [args.python, "benchmarks/memory.py", "--device", args.swinl_device, "--size", args.swinl_size,
           "--json", str(out_json), *shlex.split(args.memory_args), *args.overrides]
    started = time.perf_counter()
    code, out = run_subprocess(cmd, limit)
    seconds = time.perf_counter() - started
    record = json.loads(out_json.read_text()) if out_json.is_file() else {}
    rows, goal = record.get("rows", []), record.get("goal", [])
    if code != 0 or not rows:
        why = "timed out" if code is None else f"exit status {code}"
        result = failure("timeout" if code is None else "failed", seconds,
                         f"benchmarks/memory.py {why} after {len(rows)} rows: {tail(out, 1)}", out)
        return {**result, "rows": rows, "goal": goal}
    return {"status": "passed", "seconds": round(seconds, 1), "rows": rows, "goal": goal}


# ---------------------------------------------------------------------------------------
# children (run in their own process)
# ---------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """A child's progress line: the parent shows the last ones when a step fails."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child_env() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                     gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        facts["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        facts["driver"] = None
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
        facts["nvcc"] = tail(nvcc.stdout, 1) or None
    except (OSError, subprocess.TimeoutExpired):
        facts["nvcc"] = None
    return facts


def child_verify_build() -> dict[str, Any]:
    import dino_scale.ops as ops

    return {"native": ops.NATIVE, "cuda_kernel": ops.NATIVE is not None and ops.native.has_kernel("CUDA"),
            "cpu_kernel": ops.NATIVE is not None and ops.native.has_kernel("CPU")}


def synthetic_batch(images: int, height: int, width: int, num_classes: int, boxes_per_image: int,
                    seed: int = 0):
    """A `Batch` of random normalised images with random boxes, as the loader yields them:
    images [B, 3, H, W], masks [B, H, W] (no padding), cxcywh boxes in (0, 1), labels in
    [1, num_classes)."""
    import torch

    from dino_scale.data import Batch

    gen = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(images):
        centres = torch.rand(boxes_per_image, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(boxes_per_image, 2, generator=gen) * 0.3 + 0.05
        targets.append({
            "boxes": torch.cat([centres, sizes], 1),
            "labels": torch.randint(1, num_classes, (boxes_per_image,), generator=gen),
            "image_id": torch.tensor(i), "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
        })
    return Batch(torch.randn(images, 3, height, width, generator=gen),
                 torch.zeros(images, height, width, dtype=torch.bool), targets)


def child_swinl(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + timed training steps of the Swin-L DINO through the trainer's set-up."""
    if args.swinl_device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from dino_scale.config import load_config
    from dino_scale.engine import Components, Trainer
    from dino_scale.engine.batching import outputs_to_float
    from dino_scale.engine.optim import apply_lr, lr_factor

    height, width = args.swinl_hw
    output_dir = tempfile.mkdtemp(prefix="dino_gpu_swinl_")
    cfg = load_config(REPO / "configs" / "pretrain_o365_swinl.yaml", [
        f"deepspeed.precision={args.swinl_precision}", f"deepspeed.zero_stage={args.swinl_zero}",
        f"deepspeed.micro_batch_per_gpu={args.swinl_images}", "metrics.enabled=false",
        f"paths.output_dir={output_dir}", "data.num_workers=0",
        *VARIANTS[args.variant], *args.overrides,
    ])
    batch = synthetic_batch(args.swinl_images, height, width, cfg.model.num_classes, boxes_per_image=20)
    categories = [{"id": i, "name": f"class_{i}"} for i in range(1, cfg.model.num_classes)]
    trainer = Trainer(cfg, Components(train_loader=lambda epoch, rank, world: [batch], categories=categories))
    progress(f"swinl {args.variant}: config loaded, setting up")
    trainer.setup()
    progress("swinl: model and DeepSpeed engine ready")
    engine, criterion, device = trainer.engine, trainer.components.criterion, trainer.device
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_bytes = torch.cuda.memory_allocated() if cuda else None  # weights, grads; Adam states come at step 1
    step_seconds, phase_seconds, losses = [], {"forward": [], "loss": [], "backward": [], "step": []}, []
    for i in range(args.swinl_warmup + args.swinl_steps):
        sync()
        t0 = time.perf_counter()
        on_device = batch.to(device, dtype=trainer.dtype)
        images, masks, targets = on_device.images, on_device.masks, on_device.targets
        apply_lr(trainer.optimizer, lr_factor(cfg.optim, i, 0))  # the trainer's schedule (warm-up)
        outputs = engine(images, masks, targets)
        sync()
        t1 = time.perf_counter()
        loss_terms = criterion(outputs_to_float(outputs), targets)
        sync()
        t2 = time.perf_counter()
        engine.backward(loss_terms["loss"])
        sync()
        t3 = time.perf_counter()
        engine.step()
        sync()
        t4 = time.perf_counter()
        loss = float(loss_terms["loss"].detach())
        del outputs, loss_terms
        losses.append(loss)
        progress(f"swinl: step {i} {t4 - t0:.2f} s, loss {loss:.3f}")
        if i >= args.swinl_warmup:
            step_seconds.append(t4 - t0)
            for phase, seconds in zip(phase_seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phase_seconds[phase].append(seconds)
    if not all(map(math.isfinite, losses)):
        raise FloatingPointError(f"non-finite training loss: {losses}")
    step = statistics.median(step_seconds)
    result: dict[str, Any] = {
        "variant": args.variant, "overrides": VARIANTS[args.variant] + list(args.overrides),
        "device": str(device), "precision": args.swinl_precision, "zero_stage": args.swinl_zero,
        "images_per_step": args.swinl_images, "image_hw": [height, width],
        "num_feature_levels": cfg.model.num_feature_levels,
        "backbone_checkpointing": cfg.model.backbone.grad_checkpointing,
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "timed_steps": len(step_seconds), "seconds_per_step": step,
        "images_per_second": args.swinl_images / step,
        "phase_seconds": {k: statistics.median(v) for k, v in phase_seconds.items()},
        "losses": losses,
    }
    if cuda:
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                      allocated_after_setup_gib=setup_bytes / 2**30)
    else:
        import resource

        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_as_child(args: argparse.Namespace) -> int:
    if args.child == "env":
        result = child_env()
    elif args.child == "verify-build":
        result = child_verify_build()
    else:
        result = child_swinl(args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if args.child == "swinl":
        from dino_scale.engine import distributed as dist_utils

        dist_utils.shutdown()
    return 0


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def summary_line(name: str, result: dict[str, Any]) -> str:
    status = result["status"]
    text = f"[{status:>7}] {name:<6} {result.get('seconds', 0):6.1f} s"
    if status != "passed":
        return f"{text}  {result.get('error', '')}"
    if name == "env":
        arch = "".join(map(str, result.get("capability", [])))
        return f"{text}  {result.get('gpu')} sm_{arch}, torch {result['torch']}"
    if name == "build":
        return f"{text}  op {result['native']} for {result['arch_list']}, CUDA kernel {result['cuda_kernel']}"
    if name == "tests":
        return f"{text}  {result['passed']} passed, {result['skipped']} skipped"
    if name == "msda":
        parts = [f"{dt} {shape} fwd+bwd {r['shapes'][shape]['speedup']['fwd+bwd']:.1f}x"
                 for dt, r in result.items() if isinstance(r, dict) for shape in r["shapes"]]
        return f"{text}  " + ", ".join(parts)
    if name == "swinl":
        runs = [result] + [v for v in result["variants"].values() if v["status"] == "passed"]
        parts = [f"{r['variant']} {r['seconds_per_step']:.2f} s/step {r['images_per_second']:.2f} img/s"
                 + (f" peak {r['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in r else "")
                 for r in runs]
        return f"{text}  " + "; ".join(parts)
    if name == "memory":
        rows = result["rows"]
        out_of_memory = sum(1 for r in rows if r["out_of_memory"])
        goal = "".join(f"\n    goal: {line}" for line in result.get("goal", []))
        return f"{text}  {len(rows)} measurements ({out_of_memory} out of memory){goal}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_as_child(args)
    deadline = time.monotonic() + args.deadline
    report = Report(Path(args.out))
    print(f"GPU acceptance: steps {', '.join(args.steps)}; deadline {args.deadline:.0f} s; report {args.out}",
          flush=True)
    for name in args.steps:
        left = deadline - time.monotonic()
        # the caps are sized for a GPU machine; a CPU Swin-L step (the tests') has only the deadline
        cap = args.deadline if name in ("swinl", "memory") and args.swinl_device == "cpu" else STEP_LIMITS[name]
        limit = min(cap, left - 2)
        if limit < 5 or report.failed_step in ("env", "build"):
            why = f"only {left:.0f} s left" if limit < 5 else f"step {report.failed_step} failed"
            report.record(name, {"status": "skipped", "seconds": 0.0, "error": why})
        elif name == "env":
            report.record(name, step_env(args, limit))
        elif name == "build":
            report.record(name, step_build(args, limit, report))
        elif name == "tests":
            report.record(name, step_tests(args, limit))
        elif name == "msda":
            report.record(name, step_msda(args, limit))
        elif name == "swinl":
            report.record(name, step_swinl(args, limit, deadline))
        else:
            report.record(name, step_memory(args, limit))
        print(summary_line(name, report.steps[name]), flush=True)
        if report.steps[name]["status"] not in ("passed", "skipped") and "output_tail" in report.steps[name]:
            print(report.steps[name]["output_tail"], flush=True)
    report.save()
    failed = report.failed_step
    if failed is None:
        print(f"GPU acceptance PASSED in {report.as_dict()['seconds']:.0f} s; figures in {args.out}")
        return 0
    print(f"GPU acceptance FAILED at step {failed}: {report.steps[failed].get('error')}; figures in {args.out}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
