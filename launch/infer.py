"""Draw a checkpoint's detections on an image:
`python launch/infer.py IMAGE --config C --checkpoint W --out OUT.png`, or an exported
model's: `python launch/infer.py IMAGE --onnx model.onnx --out OUT.png`."""

from __future__ import annotations

import argparse

import cli
from dino_scale.errors import exit_process, run_command


def build_parser() -> argparse.ArgumentParser:
    return cli.infer_parser()


def main(argv: list[str] | None = None) -> int:
    cli.run_infer(cli.parse(build_parser(), argv))
    return 0


if __name__ == "__main__":
    exit_process(run_command(main, "launch/infer.py"))
