"""Convert official IDEA-Research/DINO checkpoints to dino-scale weights and back.

    python -m dino_scale.checkpoint_convert official-to-ours IN.pth OUT.safetensors
    python -m dino_scale.checkpoint_convert ours-to-official IN.safetensors OUT.pth

A command (the app layer): the formats and the conversion are `dino_scale.weights`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dino_scale.errors import DEBUG_FLAG, exit_process, run_command
from dino_scale.io import atomic_write_with
from dino_scale.weights import (
    CheckpointError,
    is_official,
    official_to_ours,
    ours_to_official,
    read_official,
    read_weights,
    save_weights,
)
from dino_scale.weights.official import UNSAFE_FLAG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dino_scale.checkpoint_convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help="tracebacks instead of one-line errors (or DINO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("official-to-ours", help="official DINO .pth -> dino-scale safetensors")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument(UNSAFE_FLAG, action="store_true", help="allow arbitrary pickled objects in SRC")
    b = sub.add_parser("ours-to-official", help="dino-scale safetensors -> official DINO .pth ({'model': ...})")
    b.add_argument("src")
    b.add_argument("dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 with one line on stderr for a missing or unreadable checkpoint."""
    return run_command(convert, "python -m dino_scale.checkpoint_convert", argv)


def convert(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "official-to-ours":
        obj = read_official(args.src, args.allow_unsafe_pickle)
        if not is_official(obj):
            raise CheckpointError(f"{args.src}: not an official DINO checkpoint (no 'model' state dict)")
        state = official_to_ours(obj["model"])
        save_weights({k: v.contiguous() for k, v in state.items()}, args.dst,
                     {"source": f"official DINO checkpoint {Path(args.src).name}"})
        print(f"wrote {len(state)} tensors to {args.dst}")
    else:
        official = ours_to_official(read_weights(args.src))
        atomic_write_with(args.dst, lambda f: torch.save({"model": official}, f))
        print(f"wrote {len(official)} official keys to {args.dst}")
    return 0


if __name__ == "__main__":
    exit_process(main())
