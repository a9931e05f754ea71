"""Run `tests/faults/train_rank.py` under the real DeepSpeed launcher (2 CPU ranks), with
bounded waits, and read back what the ranks recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch_helpers import DEEPSPEED, REPO, env, free_port

DRIVER = "tests/faults/train_rank.py"


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    record_dir: Path

    def criterion_records(self, rank: int) -> list[dict[str, Any]]:
        path = self.record_dir / f"rank{rank}.criterion.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def metrics(self, rank: int) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = (self.record_dir / f"rank{rank}.metrics.prom").read_text()
        return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def launch(args: list[str], record_dir: Path, log_path: Path, faults: dict[str, Any] | None = None,
           during: Callable[[subprocess.Popen], None] | None = None, timeout: float = 300,
           pod: bool = False, config: str | Path = "configs/demo/pretrain.yaml", num_gpus: int = 2) -> Run:
    """Run the driver with `args` on `num_gpus` ranks; `during(proc)` runs while it is alive (it may
    kill or signal it). The whole process group is killed on timeout or test failure.

    `pod=True` starts it as a training pod does: `k8s/scripts/deepspeed_node.py` (PID 1 of
    the pod, which forwards SIGTERM to the ranks) around `deepspeed --no_ssh`. The plain
    `deepspeed` runner exits on SIGTERM without forwarding it on one node."""
    record_dir.mkdir(parents=True, exist_ok=True)
    e = env()
    e["DINO_FAULTS"] = json.dumps({**(faults or {}), "record_dir": str(record_dir)})
    launcher = [DEEPSPEED, "--num_gpus", str(num_gpus), "--master_port", str(free_port())]
    if pod:
        launcher = [sys.executable, "k8s/scripts/deepspeed_node.py", *launcher, "--no_ssh", "--num_nodes", "1",
                    "--node_rank", "0", "--master_addr", "127.0.0.1", "--hostfile", str(record_dir / "hostfile")]
    cmd = [*launcher, DRIVER, "--config", str(config), *args]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        if during is not None:
            during(proc)
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Run(proc.returncode, log_path.read_text(), time.monotonic() - started, record_dir)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def exit_within(proc: subprocess.Popen, seconds: float) -> float:
    """Seconds until `proc` exits; fails when it is still running after `seconds` (a hang)."""
    start = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job still runs {seconds} s after the fault: hung") from None
    return time.monotonic() - start
