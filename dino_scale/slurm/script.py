"""sbatch scripts for the dino-scale stages: what `python -m dino_scale.slurm submit` writes.

Training: one `srun` task per node runs k8s/scripts/deepspeed_node.py (the launcher the
Kubernetes pods run), which starts `deepspeed --no_ssh` for that node's ranks; node rank,
master address and port come from the Slurm environment. The batch shell traps the
time-limit warning (`--signal=B:USR1@S`), passes SIGTERM to the ranks (they checkpoint, as
on a Kubernetes preemption), waits for them and requeues the job; the requeued job resumes
from the newest complete checkpoint in the same output directory.

Shard building: a Ray head (no CPUs, as in the RayJob manifest) on the first node, a Ray
worker on every node, then `python -m data_pipeline.build_shards --ray-address HEAD:PORT`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = {"pretrain": "launch/pretrain_o365.py", "finetune": "launch/finetune_coco.py",
          "build-shards": "data_pipeline.build_shards"}
TIME_LIMIT_SIGNAL = "USR1"


@dataclass
class Job:
    stage: str
    run_dir: Path  # the run's output directory; the script and Slurm logs go to <run_dir>/slurm
    workdir: Path  # where the stage runs (relative paths of the command mean what they meant here)
    python: str
    args: list[str]  # arguments of the stage's command (config, overrides / build_shards flags)
    nodes: int = 1
    gpus_per_node: int = 1
    cpu_ranks: bool = False  # ranks are CPU processes: ask Slurm for CPUs instead of GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    signal_seconds: int = 120
    job_name: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / f"{self.stage}.sbatch"


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _header(job: Job) -> list[str]:
    name = job.job_name or f"dino-{job.stage}"
    logs = job.run_dir / "slurm"
    lines = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
             f"--output={logs}/%x-%j.out", "--open-mode=append"]
    if job.stage != "build-shards":
        if not job.cpu_ranks:
            lines.append(f"--gpus-per-node={job.gpus_per_node}")
        lines += ["--requeue", f"--signal=B:{TIME_LIMIT_SIGNAL}@{job.signal_seconds}"]
    cpus = job.cpus_per_task or (job.gpus_per_node if job.cpu_ranks and job.stage != "build-shards" else None)
    if cpus:
        lines.append(f"--cpus-per-task={cpus}")
    for flag, value in (("partition", job.partition), ("account", job.account), ("time", job.time)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += job.extra_sbatch
    return [f"#SBATCH {line}" for line in lines]


def _common(job: Job) -> list[str]:
    return [
        "set -uo pipefail",
        f"cd {_q(job.workdir)}",
        f"PYTHON={_q(job.python)}",
        f"REPO={_q(REPO)}",
        f"RUN_DIR={_q(job.run_dir)}",
        'NODE_LOGS="$RUN_DIR/slurm/job-$SLURM_JOB_ID"',
        'mkdir -p "$NODE_LOGS"',
        "export PYTHONUNBUFFERED=1",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
        'node logs in $NODE_LOGS"',
    ]


def _training_body(job: Job) -> list[str]:
    deepspeed = str(Path(job.python).parent / "deepspeed")
    command = " ".join(_q(a) for a in [STAGES[job.stage], *job.args])
    return [
        "",
        "# rendezvous: the first node of the allocation, a port derived from the job id",
        'export MASTER_ADDR="$HEAD_NODE"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f"DEEPSPEED={_q(deepspeed)}",
        f"GPUS_PER_NODE={job.gpus_per_node}",
        f"TRAIN=({command})",
        "",
        "# Time limit (USR1, from --signal) or preemption / scancel (TERM): SIGTERM to every",
        "# node's launcher, which passes it to the ranks; they checkpoint and exit. Only the",
        "# time limit requeues: a preempted job is requeued by Slurm, a cancelled one stays so.",
        "requeue=0",
        "stop_ranks() { scancel --signal=TERM \"$SLURM_JOB_ID\"; }",
        f"trap 'echo \"$(date -u +%T) time-limit signal: checkpointing\"; requeue=1; stop_ranks' {TIME_LIMIT_SIGNAL}",
        "trap 'echo \"$(date -u +%T) SIGTERM: checkpointing\"; stop_ranks' TERM",
        "",
        "export PYTHON REPO DEEPSPEED GPUS_PER_NODE  # for the node command below",
        'srun --ntasks-per-node=1 --kill-on-bad-exit=0 --open-mode=append \\',
        '    --output="$NODE_LOGS/node-%n.out" --error="$NODE_LOGS/node-%n.err" \\',
        "    bash -c 'exec \"$PYTHON\" \"$REPO/k8s/scripts/deepspeed_node.py\" \"$DEEPSPEED\" --no_ssh \\",
        '        --num_nodes "$SLURM_JOB_NUM_NODES" --num_gpus "$GPUS_PER_NODE" --node_rank "$SLURM_NODEID" \\',
        '        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \\',
        '        --hostfile "/tmp/dino-slurm-$SLURM_JOB_ID/hostfile" "$REPO/$0" "$@"\' "${TRAIN[@]}" &',
        "pid=$!",
        "# `wait` returns early when a trap runs: wait until srun itself has ended",
        'while :; do wait "$pid"; status=$?; kill -0 "$pid" 2>/dev/null || break; done',
        'echo "$(date -u +%T) ranks exited with status $status"',
        'if [ "$requeue" = 1 ] && [ "$status" != 0 ]; then',
        '    echo "requeueing job $SLURM_JOB_ID: it resumes from the newest complete checkpoint"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]


def _shards_body(job: Job) -> list[str]:
    command = " ".join(_q(a) for a in job.args)
    return [
        "",
        'HEAD_IP=$(getent ahostsv4 "$HEAD_NODE" | awk \'NR == 1 { print $1 }\')',
        "RAY_PORT=$((30000 + SLURM_JOB_ID % 20000))",
        'RAY_ADDRESS_="$HEAD_IP:$RAY_PORT"',
        'RAY_BIN="$(dirname "$PYTHON")/ray"',
        'CPUS="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"',
        "export RAY_USAGE_STATS_ENABLED=0",
        "",
        "# the head schedules only (as in k8s/base/build-shards); a worker on every node does the work",
        'srun --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --overlap --output="$NODE_LOGS/ray-head.out" \\',
        '    "$RAY_BIN" start --head --block --num-cpus=0 --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \\',
        '    --include-dashboard=false --temp-dir="/tmp/ray-slurm-$SLURM_JOB_ID" &',
        "head_pid=$!",
        "for _ in $(seq 60); do",
        '    "$RAY_BIN" status --address="$RAY_ADDRESS_" >/dev/null 2>&1 && break; sleep 2',
        "done",
        'srun --ntasks-per-node=1 --overlap --output="$NODE_LOGS/ray-worker-%n.out" \\',
        '    "$RAY_BIN" start --block --address="$RAY_ADDRESS_" --num-cpus="$CPUS" &',
        "workers_pid=$!",
        "# a worker per node, plus the head",
        'want=$((SLURM_JOB_NUM_NODES + 1)); joined=0',
        "for _ in $(seq 60); do",
        '    joined=$("$PYTHON" -c "import ray; ray.init(address=\'$RAY_ADDRESS_\', logging_level=\'ERROR\'); '
        "print(sum(n['Alive'] for n in ray.nodes()))\" 2>/dev/null || echo 0)",
        '    [ "$joined" -ge "$want" ] && break; sleep 2',
        "done",
        'echo "$(date -u +%T) ray cluster at $RAY_ADDRESS_: $joined of $want nodes"',
        "",
        f'"$PYTHON" -m {STAGES["build-shards"]} {command} --ray-address "$RAY_ADDRESS_"',
        "status=$?",
        "# workers first: stopped after the head, each waits 30 s for the head's GCS to drain it",
        'kill -TERM "$workers_pid"; wait "$workers_pid" 2>/dev/null',
        'kill -TERM "$head_pid"; wait "$head_pid" 2>/dev/null',
        'rm -rf "/tmp/ray-slurm-$SLURM_JOB_ID"',
        'echo "$(date -u +%T) build_shards exited with status $status"',
        'exit "$status"',
    ]


def render(job: Job) -> str:
    """The sbatch script of `job`, readable as is."""
    if job.stage not in STAGES:
        raise ValueError(f"unknown stage {job.stage!r}; one of {sorted(STAGES)}")
    body = _shards_body(job) if job.stage == "build-shards" else _training_body(job)
    intro = [
        "#!/bin/bash",
        f"# dino-scale {job.stage} on Slurm, written by `python -m dino_scale.slurm submit`.",
        "# Submit again with `sbatch THIS_FILE`; the run resumes from its newest complete checkpoint."
        if job.stage != "build-shards" else "# Submit again with `sbatch THIS_FILE`.",
    ]
    return "\n".join([*intro, *_header(job), "", *_common(job), *body]) + "\n"
