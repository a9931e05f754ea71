"""COCO bbox evaluation of a checkpoint: `python launch/evaluate.py --config C --checkpoint W`
(or under `deepspeed --num_gpus N` to spread inference over ranks)."""

from __future__ import annotations

import argparse

import cli
from dino_scale.errors import exit_process, run_command


def build_parser() -> argparse.ArgumentParser:
    return cli.evaluate_parser()


def main(argv: list[str] | None = None) -> int:
    cli.run_evaluate(cli.parse(build_parser(), argv))
    return 0


if __name__ == "__main__":
    exit_process(run_command(main, "launch/evaluate.py"))
