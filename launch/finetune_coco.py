"""Fine-tune a pretrained DINO on COCO with DeepSpeed ZeRO.

    deepspeed launch/finetune_coco.py --config CONFIG.yaml --pretrained PATH [key.sub=value ...]
"""

from __future__ import annotations

import argparse

import cli
from dino_scale.errors import exit_process, run_command


def build_parser() -> argparse.ArgumentParser:
    return cli.training_parser("launch/finetune_coco.py", "Fine-tune a pretrained DINO on COCO with DeepSpeed ZeRO",
                               finetune=True)


def main(argv: list[str] | None = None) -> int:
    return cli.run_training(cli.parse(build_parser(), argv))


if __name__ == "__main__":
    exit_process(run_command(main, "launch/finetune_coco.py"))
