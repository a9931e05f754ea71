"""`make demo`: generated data -> Ray shards -> DeepSpeed pretraining -> fine-tuning -> COCO
eval, printing the AP table (see `dino_scale.demo`)."""

from __future__ import annotations

import argparse
import sys

from dino_scale import demo


def build_parser() -> argparse.ArgumentParser:
    return demo.build_parser()


def main(argv: list[str] | None = None) -> int:
    demo.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
