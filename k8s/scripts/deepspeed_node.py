#!/usr/bin/env python3
"""Run `deepspeed --no_ssh` as PID 1 of one node (pod) of a multi-node Kubernetes job.

    python k8s/scripts/deepspeed_node.py deepspeed --no_ssh --num_nodes N --num_gpus G \\
        --node_rank R --master_addr HOST --master_port P --hostfile /tmp/dino/hostfile \\
        launch/pretrain_o365.py --config CONFIG [key.sub=value ...]

Everything after the script name is the `deepspeed` command line, unchanged. This wrapper
first runs the preflight (`python -m dino_scale.preflight` with the training script's
arguments and the job's world size): a misconfigured job (missing shards or weights, no S3
credentials, a bad config value, ...) ends with exit status 2 and one line per problem in
seconds, before any rank starts. Then it adds the two things the launcher lacks inside a pod:

- `--no_ssh` still sizes the world from a hostfile (and checks `0 <= node_rank < hosts`):
  an N-line hostfile, `node-<i> slots=G`, is written at the `--hostfile` path first. The
  host names are only keys; every pod connects to `--master_addr`.
- Kubernetes stops a pod by sending SIGTERM to PID 1 and SIGKILL after
  terminationGracePeriodSeconds. The `deepspeed` runner does not forward signals in
  `--no_ssh` mode, and `deepspeed.launcher.launch` kills its children 30 s after it gets
  one, whatever the grace period. So the launcher runs in its own session, out of reach,
  and SIGTERM goes straight to the training processes (the launcher's children), which
  write their checkpoint and exit; the launcher then exits on its own.

The exit status is the launcher's, or 128 + signal number when a signal stopped the run,
so a stopped run never reads as a finished one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import psutil

# deepspeed's own parser, so the wrapper and the launcher agree on every flag
from deepspeed.launcher.runner import DLTS_HOSTFILE
from deepspeed.launcher.runner import parse_args as parse_deepspeed_args

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LaunchError(ValueError):
    """The deepspeed command line cannot start one node of a multi-node job."""


def check_command(argv: list[str]):
    """Parse `deepspeed ...` with DeepSpeed's parser; raise LaunchError if unusable here."""
    if not argv or Path(argv[0]).name != "deepspeed":
        raise LaunchError(f"expected a command starting with 'deepspeed', got {argv[:1]}")
    args = parse_deepspeed_args(argv[1:])
    problems = []
    if not args.no_ssh:
        problems.append("--no_ssh is required (pods have no ssh)")
    if args.num_nodes < 1:
        problems.append(f"--num_nodes must be >= 1, got {args.num_nodes}")
    if args.num_gpus < 1:
        problems.append(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if not 0 <= args.node_rank < max(args.num_nodes, 1):
        problems.append(f"--node_rank must be in [0, {args.num_nodes}), got {args.node_rank}")
    if not args.master_addr:
        problems.append("--master_addr is required")
    if args.hostfile == DLTS_HOSTFILE:
        problems.append("--hostfile must name a writable path (e.g. /tmp/dino/hostfile), "
                        f"not the default {DLTS_HOSTFILE}")
    if problems:
        raise LaunchError("; ".join(problems))
    return args


def write_hostfile(path: str | Path, num_nodes: int, slots: int) -> Path:
    """Write `node-<i> slots=<slots>` for i < num_nodes (atomic: rename of a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"node-{i} slots={slots}\n" for i in range(num_nodes)))
    os.replace(tmp, path)
    return path


def training_processes(runner_pid: int) -> list[psutil.Process]:
    """The launcher's children: runner (`deepspeed`) -> launch.py -> one process per rank."""
    try:
        launchers = psutil.Process(runner_pid).children()
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for launcher in launchers:
        try:
            ranks.extend(launcher.children())
        except psutil.NoSuchProcess:
            pass
    return ranks


def preflight_command(args) -> list[str] | None:
    """`python -m dino_scale.preflight` with the training script's arguments, for the whole
    job; None when the script takes no `--config` (not a dino-scale training script)."""
    if not any(a == "--config" or a.startswith("--config=") for a in args.user_args):
        return None
    return [sys.executable, "-m", "dino_scale.preflight", *args.user_args,
            "--world-size", str(args.num_nodes * args.num_gpus)]


def run(argv: list[str]) -> int:
    args = check_command(argv)
    preflight = preflight_command(args)
    code = subprocess.call(preflight) if preflight else 0
    if code != 0:
        print(f"deepspeed_node: preflight failed (exit status {code}); the launcher was not started",
              file=sys.stderr, flush=True)
        return code
    write_hostfile(args.hostfile, args.num_nodes, args.num_gpus)
    print(
        f"deepspeed_node: node {args.node_rank}/{args.num_nodes}, {args.num_gpus} ranks per node, "
        f"master {args.master_addr}:{args.master_port}",
        flush=True,
    )
    runner = subprocess.Popen(argv, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        ranks = training_processes(runner.pid)
        if not ranks:  # nothing is training yet: stop the launcher itself
            try:
                os.killpg(runner.pid, signum)
            except ProcessLookupError:
                pass
            return
        for proc in ranks:
            try:
                proc.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        print(f"deepspeed_node: sent signal {signum} to ranks {[p.pid for p in ranks]}", flush=True)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    code = runner.wait()
    if received:
        return 128 + received[0]
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except LaunchError as exc:
        print(f"deepspeed_node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
