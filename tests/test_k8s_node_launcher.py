"""k8s/scripts/deepspeed_node.py: the PID-1 wrapper of `deepspeed --no_ssh` in training pods.

The signal test runs the real `deepspeed` launcher (CPU accelerator) with a stand-in
training script and checks what a pod deletion does: each rank gets exactly one SIGTERM
(from the wrapper, none from deepspeed's launcher), can take its time to checkpoint, and
the pod's exit status says it was stopped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_scale.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "k8s" / "scripts" / "deepspeed_node.py"


def load_launcher():
    spec = importlib.util.spec_from_file_location("deepspeed_node", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ds_command(hostfile: Path, *, nodes: int = 2, gpus: int = 2, rank: int = 1, port: int = 29611,
               script: str = "train.py", extra: tuple[str, ...] = ()) -> list[str]:
    return ["deepspeed", "--no_ssh", "--num_nodes", str(nodes), "--num_gpus", str(gpus),
            "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--hostfile", str(hostfile), script, *extra]


def test_hostfile_lists_every_node(tmp_path: Path) -> None:
    launcher = load_launcher()
    path = launcher.write_hostfile(tmp_path / "sub" / "hostfile", num_nodes=3, slots=8)
    assert path.read_text() == "node-0 slots=8\nnode-1 slots=8\nnode-2 slots=8\n"
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("change,message", [
    (lambda a: [x for x in a if x != "--no_ssh"], "--no_ssh is required"),
    (lambda a: a[:a.index("--node_rank") + 1] + ["2"] + a[a.index("--node_rank") + 2:], "--node_rank"),
    (lambda a: a[:a.index("--num_gpus")] + a[a.index("--num_gpus") + 2:], "--num_gpus"),
    (lambda a: a[:a.index("--master_addr")] + a[a.index("--master_addr") + 2:], "--master_addr"),
    (lambda a: a[:a.index("--hostfile")] + a[a.index("--hostfile") + 2:], "--hostfile"),
    (lambda a: ["torchrun"] + a[1:], "starting with 'deepspeed'"),
])
def test_unusable_commands_are_refused(tmp_path: Path, change, message: str, capsys) -> None:
    launcher = load_launcher()
    argv = change(ds_command(tmp_path / "hostfile"))
    assert launcher.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hostfile").exists()


def test_a_misconfigured_job_stops_before_the_launcher(tmp_path: Path, capfd) -> None:
    """The preflight runs first, with the job's world size: exit status 2, one line per
    problem, no hostfile, no launcher (the script named does not even exist)."""
    launcher = load_launcher()
    argv = ds_command(tmp_path / "hostfile", script="launch/pretrain_o365.py", extra=(
        "--config", str(REPO / "configs/demo/pretrain.yaml"), f"data.train_shards={tmp_path}/missing",
        f"paths.output_dir={tmp_path}/out", "deepspeed.micro_batch_per_gpu=0"))
    assert launcher.preflight_command(launcher.check_command(argv))[-2:] == ["--world-size", "4"]
    assert launcher.main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert any("data.train_shards" in line and "/missing" in line for line in errors), err
    assert any("micro_batch_per_gpu" in line for line in errors), err
    assert "the launcher was not started" in err
    assert not (tmp_path / "hostfile").exists()


STAND_IN = """
import os, signal, sys, time
out = sys.argv[-1]
rank = os.environ["RANK"]
received = []
signal.signal(signal.SIGTERM, lambda s, f: received.append(s))
with open(f"{out}/ready{rank}", "w") as f:
    f.write(f"{os.environ['WORLD_SIZE']} {os.environ['LOCAL_RANK']}")
while not received:
    time.sleep(0.05)
time.sleep(1.5)  # "writing the checkpoint"; deepspeed's launcher would signal again meanwhile
with open(f"{out}/done{rank}", "w") as f:
    f.write(str(len(received)))
sys.exit(143)
"""


@pytest.mark.slow  # two deepspeed launcher start-ups (~10-25 s)
def test_sigterm_reaches_each_rank_once(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(STAND_IN)
    env = dict(os.environ, DS_ACCELERATOR="cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = ds_command(tmp_path / "hostfile", port=free_port(), script=str(tmp_path / "train.py"),
                      extra=(str(tmp_path),))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (2, 3)):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # node 1 of 2 with 2 ranks each: global ranks 2 and 3 of 4
    assert (tmp_path / "hostfile").read_text() == "node-0 slots=2\nnode-1 slots=2\n"
    assert (tmp_path / "ready2").read_text() == "4 0"
    assert (tmp_path / "ready3").read_text() == "4 1"
    for rank in (2, 3):
        assert (tmp_path / f"done{rank}").read_text() == "1", output  # one SIGTERM, finished
    assert proc.returncode == 128 + signal.SIGTERM, output
