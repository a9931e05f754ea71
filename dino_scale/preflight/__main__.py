"""`python -m dino_scale.preflight --config C [key.sub=value ...] [--pretrained P] [--resume]`:
check a training run before starting it; prints what was checked, exits 2 with one line
per problem. `--checkpoint W` checks an evaluation instead (strict weights, val set)."""

from __future__ import annotations

import argparse
import os

from dino_scale.config import load_config
from dino_scale.errors import exit_process, run_command
from dino_scale.preflight import Plan, require, run_preflight

PROG = "python -m dino_scale.preflight"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--pretrained", default=None, help="weights the training run starts from")
    parser.add_argument("--pretrained-categories", default=None, help="categories of --pretrained")
    parser.add_argument("--allow-unsafe-pickle", action="store_true")
    parser.add_argument("--resume", action="store_true", help="a complete checkpoint to resume from must exist")
    parser.add_argument("--checkpoint", default=None, help="check an evaluation of these weights instead")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks of the run (default $WORLD_SIZE or 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, list(args.overrides))
    if args.pretrained:
        cfg.train.pretrained = args.pretrained
    if args.pretrained_categories:
        cfg.train.pretrained_categories = args.pretrained_categories
    if args.checkpoint:
        plan = Plan(train=False, require_val=True, weights=args.checkpoint, weights_key="--checkpoint",
                    transfer=False, allow_unsafe_pickle=args.allow_unsafe_pickle)
    else:
        plan = Plan(weights=cfg.train.pretrained, resume=args.resume, allow_unsafe_pickle=args.allow_unsafe_pickle)
    report = run_preflight(cfg, plan, world_size=args.world_size)
    print(report.table(), flush=True)
    require(report)
    return 0


if __name__ == "__main__":
    exit_process(run_command(main, PROG))
