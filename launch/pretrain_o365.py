"""Pretrain DINO (Objects365 recipe) with DeepSpeed ZeRO.

    deepspeed launch/pretrain_o365.py --config CONFIG.yaml [key.sub=value ...]
"""

from __future__ import annotations

import argparse

import cli
from dino_scale.errors import exit_process, run_command


def build_parser() -> argparse.ArgumentParser:
    return cli.training_parser("launch/pretrain_o365.py", "Pretrain DINO (Objects365 recipe) with DeepSpeed ZeRO",
                               finetune=False)


def main(argv: list[str] | None = None) -> int:
    return cli.run_training(cli.parse(build_parser(), argv))


if __name__ == "__main__":
    exit_process(run_command(main, "launch/pretrain_o365.py"))
