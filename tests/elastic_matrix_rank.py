"""One rank of the elastic-resume matrix (tests/test_elastic_resume.py), run by the DeepSpeed
launcher: for each (ZeRO stage, precision) case, the trainer with the tiny stand-in model.

    --phase first   (2 ranks) per case: an uninterrupted run of 12 steps in <out>/<case>/reference,
                    and 4 steps in <out>/<case>/chain
    --phase shrink  (1 rank, 2 accumulation steps: the same global batch) per case: the chain
                    resumed to step 8
    --phase grow    (2 ranks) per case: the chain resumed to step 12, the end of the epoch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino_scale.config import load_config  # noqa: E402
from dino_scale.engine import Components, train  # noqa: E402
from dino_scale.log import setup_logging  # noqa: E402
from engine_standins import TinyCriterion, TinyDetector, TinyLoader  # noqa: E402


def run(out: Path, stage: int, precision: str, steps: int, accumulation: int) -> None:
    cfg = load_config(None, [
        f"paths.output_dir={out}", "metrics.base_port=0", "train.eval_at_end=false", "train.export_at_end=false",
        f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "deepspeed.micro_batch_per_gpu=2",
        f"deepspeed.gradient_accumulation_steps={accumulation}", f"optim.max_steps={steps}",
        "optim.warmup_steps=0", "train.checkpoint_every_steps=4",
    ])
    torch.manual_seed(0)
    model = TinyDetector()
    model.dropout.p = 0.0  # the stand-in's dropout would draw per micro-batch: fine, but not what is tested here
    train(cfg, Components(
        model=model, criterion=TinyCriterion(),
        train_loader=lambda epoch, rank, world: TinyLoader(12, 2, rank=rank, seed=3, epoch=epoch, global_noise=False),
        eval_loader=lambda: None, postprocess=torch.nn.Identity(), categories=[]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=["first", "shrink", "grow"], required=True)
    parser.add_argument("--cases", nargs="+", required=True, help="stage:precision, e.g. 1:bf16")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    for case in args.cases:
        stage, precision = case.split(":")
        base = Path(args.out) / f"zero{stage}_{precision}"
        if args.phase == "first":
            run(base / "reference", int(stage), precision, 12, 1)
            run(base / "chain", int(stage), precision, 4, 1)
        elif args.phase == "shrink":
            run(base / "chain", int(stage), precision, 8, 2)
        else:
            run(base / "chain", int(stage), precision, 12, 1)


if __name__ == "__main__":
    main()
