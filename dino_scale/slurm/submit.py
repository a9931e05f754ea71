"""`python -m dino_scale.slurm submit {pretrain,finetune,build-shards} ...`

    python -m dino_scale.slurm submit pretrain --config C --nodes N --gpus-per-node G \\
        [--partition P] [--time HH:MM:SS] [--account A] [--dry-run] [key.sub=value ...]
    python -m dino_scale.slurm submit finetune --config C --pretrained PATH ...
    python -m dino_scale.slurm submit build-shards --nodes N [--run-dir DIR] ... \\
        -- --annotations A.json --images DIR --output DIR   (data_pipeline.build_shards flags)

Writes the sbatch script to <run dir>/slurm/<stage>.sbatch and submits it with `sbatch`
(`--dry-run` prints it instead). The run dir of training is the config's paths.output_dir.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dino_scale.config import load_config
from dino_scale.slurm.script import STAGES, Job, render


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dino_scale.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("submit", help="write an sbatch script for a stage and submit it")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--config", help="training config (pretrain, finetune)")
    p.add_argument("--pretrained", help="finetune: checkpoint to start from (as launch/finetune_coco.py)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="ranks per node (with --cpu-ranks: CPU processes, no GPUs asked for)")
    p.add_argument("--cpu-ranks", action="store_true",
                   help="CPU-only cluster: request --cpus-per-task instead of --gpus-per-node")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (one task per node)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, HH:MM:SS (or any sbatch --time form)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="training: seconds before the time limit at which the job checkpoints and requeues")
    p.add_argument("--job-name")
    p.add_argument("--run-dir", help="build-shards: where the script and logs go (default outputs/slurm/build-shards)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="FLAG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (training stages)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `submit` arguments; overrides may stand before, between or after the flags."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    return args


def build_job(args: argparse.Namespace, passthrough: list[str]) -> Job:
    """The Job of parsed `submit` arguments; `passthrough` are the flags after `--`."""
    workdir = Path.cwd()
    common = dict(stage=args.stage, workdir=workdir, python=sys.executable, nodes=args.nodes,
                  gpus_per_node=args.gpus_per_node, cpu_ranks=args.cpu_ranks, cpus_per_task=args.cpus_per_task,
                  partition=args.partition, account=args.account, time=args.time,
                  signal_seconds=args.signal_seconds, job_name=args.job_name, extra_sbatch=args.sbatch_arg)
    if args.stage == "build-shards":
        if args.config or args.overrides or args.pretrained:
            raise SystemExit("build-shards takes data_pipeline.build_shards flags after `--`, not a config")
        if not passthrough:
            raise SystemExit("build-shards: give the build_shards flags after `--` (--annotations, --images, --output)")
        if "--ray-address" in passthrough:
            raise SystemExit("build-shards: --ray-address is set by the job (the Ray head it starts)")
        run_dir = workdir / (args.run_dir or "outputs/slurm/build-shards")
        return Job(run_dir=run_dir, args=passthrough, **common)
    if not args.config:
        raise SystemExit(f"{args.stage}: --config is required")
    if passthrough:
        raise SystemExit(f"{args.stage}: unexpected arguments after `--`: {passthrough}")
    if args.stage == "finetune" and not args.pretrained:
        raise SystemExit("finetune: --pretrained is required")
    cfg = load_config(args.config, args.overrides)  # fails here, not in the queue, on a bad key
    config = str(Path(args.config).resolve())
    stage_args = ["--config", config, *(["--pretrained", args.pretrained] if args.pretrained else []), *args.overrides]
    return Job(run_dir=workdir / cfg.paths.output_dir, args=stage_args, **common)


def submit(job: Job) -> str:
    """Write the job's script and `sbatch` it; returns the Slurm job id."""
    script = job.script_path
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render(job))
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = parse(argv)
    job = build_job(args, passthrough)
    if args.dry_run:
        print(render(job), end="")
        return 0
    job_id = submit(job)
    print(f"submitted {args.stage} as Slurm job {job_id}: {job.script_path}; "
          f"logs in {job.run_dir / 'slurm'}", flush=True)
    return 0
