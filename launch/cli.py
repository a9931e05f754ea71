"""Command-line front ends of the `launch/*.py` scripts: argument parsers and the code they
run (the scripts import it as a sibling module: they run as files).

Training scripts take `--config FILE` and `key.sub=value` overrides; the DeepSpeed launcher
adds `--local_rank=N`, which is accepted (the rank comes from the environment).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from dino_scale.config import Config, dump_config, load_config
from dino_scale.data import build_eval_loader
from dino_scale.engine import distributed as dist_utils
from dino_scale.engine.evaluator import evaluate
from dino_scale.engine.inference import detect, draw_detections, names_for
from dino_scale.engine.trainer import PREEMPTED_EXIT_CODE, train
from dino_scale.errors import DEBUG_FLAG, UserError
from dino_scale.log import current_rank, get_logger, setup_logging
from dino_scale.models import PostProcess, build_dino
from dino_scale.preflight import Plan, require, run_preflight
from dino_scale.weights import load_model, load_state_into, read_weights

try:  # the `export` extra (onnx, onnxruntime): only `launch/infer.py --onnx` needs it
    from dino_scale.export.runtime import OnnxDetector, detect_onnx
except ImportError as exc:
    OnnxDetector = detect_onnx = None
    _ONNX_MISSING = str(exc)

log = get_logger(__name__)


def _common(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. optim.lr=2e-4 deepspeed.zero_stage=3")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the DeepSpeed launcher; the rank is read from the environment")
    add_debug_flag(parser)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show tracebacks instead of one-line errors (or DINO_DEBUG=1)")


def preflight(cfg: Config, plan: Plan) -> None:
    """Rank 0 checks what the run needs before any process group or model exists; a problem
    ends the command with one line each (the launcher then stops the other ranks)."""
    if current_rank() != 0:
        return
    report = require(run_preflight(cfg, plan, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    for check in report.checks:
        if check.status == "warn":
            log.warning("preflight: %s: %s", check.name, check.detail)
    log.info("preflight: %d checks passed in %.1f s", len(report.checks), report.seconds)


def training_parser(prog: str, description: str, finetune: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _common(parser)
    parser.add_argument(
        "--pretrained", required=finetune, default=None,
        help="weights to start from: a dino-scale export (.safetensors) or an official "
             "IDEA-Research DINO checkpoint (.pth); sets train.pretrained",
    )
    parser.add_argument("--pretrained-categories", default=None,
                        help="COCO JSON or shard manifest with the categories the pretrained "
                             "weights were trained on (official checkpoints do not record them)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow arbitrary pickled objects in --pretrained (trusted files only)")
    return parser


def _training_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.pretrained:
        cfg.train.pretrained = args.pretrained
    if args.pretrained_categories:
        cfg.train.pretrained_categories = args.pretrained_categories
    if args.allow_unsafe_pickle:
        cfg.train.allow_unsafe_pickle = True
    return cfg


def run_training(args: argparse.Namespace) -> int:
    """Train on every rank; exit status 143 when stopped by SIGTERM (checkpoint written)."""
    cfg = _training_config(args)
    output_dir = Path(cfg.paths.output_dir)
    setup_logging()
    preflight(cfg, Plan(weights=cfg.train.pretrained, allow_unsafe_pickle=cfg.train.allow_unsafe_pickle))
    setup_logging(cfg.paths.log_dir or output_dir / "logs")
    dist_utils.init_distributed()
    if dist_utils.rank() == 0:
        dump_config(cfg, output_dir / "config.yaml")
    # No barrier when training failed: a rank that fails alone (bad data, disk full) would
    # wait in it for ranks that wait in their next collective for it, and the job would
    # hang; exiting lets the launcher stop the others.
    result = train(cfg)
    dist_utils.shutdown()
    if result.preempted:
        log.warning("stopped by SIGTERM at step %d; rerun the same command to resume", result.step)
        return PREEMPTED_EXIT_CODE
    return 0


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        description="COCO bbox evaluation of a checkpoint (any number of ranks)",
    )
    _common(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="dino-scale export (.safetensors) or official DINO .pth")
    parser.add_argument("--output", default=None,
                        help="JSON file for the stats (default <output_dir>/eval/evaluate.json)")
    parser.add_argument("--detections", default=None, help="also write the COCO detections JSON")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per rank (default deepspeed.micro_batch_per_gpu)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true")
    return parser


def run_evaluate(args: argparse.Namespace) -> dict[str, float]:
    cfg = load_config(args.config, list(args.overrides))
    setup_logging()
    output = Path(args.output or Path(cfg.paths.output_dir) / "eval" / "evaluate.json")
    preflight(cfg, Plan(train=False, require_val=True, weights=args.checkpoint, weights_key="--checkpoint",
                        transfer=False, allow_unsafe_pickle=args.allow_unsafe_pickle,
                        outputs=[str(output)] + ([args.detections] if args.detections else [])))
    dist_utils.init_distributed()
    cfg.model.backbone.pretrained_path = None
    model = build_dino(cfg.model)
    load_state_into(model, read_weights(args.checkpoint, args.allow_unsafe_pickle))
    device = dist_utils.device()
    model.to(device)
    loader = build_eval_loader(
        cfg.data, batch_size=args.batch_size or cfg.deepspeed.micro_batch_per_gpu,
        rank=dist_utils.rank(), world_size=dist_utils.world_size(),
    )
    stats = evaluate(model, loader, cfg.data.val_annotations,
                     postprocess=PostProcess(cfg.model.num_select), device=device,
                     output_json=output if dist_utils.rank() == 0 else None,
                     detections_json=args.detections if dist_utils.rank() == 0 else None)
    # Only on success, as in run_training: a rank failing alone must not wait in a barrier
    # for ranks blocked in their next collective; exiting lets the launcher stop them.
    dist_utils.shutdown()
    if dist_utils.rank() == 0:
        print(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------------------------------
# inference on one image
# ---------------------------------------------------------------------------------------


def infer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/infer.py",
                                     description="Draw a checkpoint's detections on an image")
    parser.add_argument("image", help="input image (JPEG/PNG)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="dino-scale export (.safetensors) or official DINO .pth")
    source.add_argument("--onnx", help="a `python -m dino_scale.export onnx` file, run with ONNX Runtime (CPU)")
    parser.add_argument("--config", default=None,
                        help="YAML config of the model (required with --checkpoint; with --onnx the "
                             "config stored in the file is the default)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score threshold (default train.draw_score_threshold)")
    parser.add_argument("--categories", default=None,
                        help="COCO JSON / manifest for class names (default: the export's metadata)")
    parser.add_argument("--scale", type=float, default=1.0, help="enlarge the drawing (small images)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--allow-unsafe-pickle", action="store_true")
    add_debug_flag(parser)
    return parser


def run_infer(args: argparse.Namespace) -> list[dict]:
    if args.onnx:
        if OnnxDetector is None:
            raise UserError(f"launch/infer.py --onnx needs the export extra (pip install 'dino-scale[export]'): "
                            f"{_ONNX_MISSING}")
        if not Path(args.onnx).is_file():
            raise UserError(f"--onnx {args.onnx} does not exist")
        if not Path(args.image).is_file():
            raise UserError(f"{args.image} does not exist: check the IMAGE argument")
        detector = OnnxDetector(args.onnx)
        overrides = list(args.overrides)
        cfg = load_config(args.config, overrides) if args.config else detector.config(overrides)
        detections = detect_onnx(detector, args.image, cfg)
        names = names_for(args.onnx, args.categories) if args.categories else detector.category_names()
    else:
        if not args.config:
            raise UserError("launch/infer.py: --config is required with --checkpoint")
        cfg = load_config(args.config, list(args.overrides))
        if args.categories and not Path(args.categories).is_file():
            raise UserError(f"--categories {args.categories} does not exist")
        preflight(cfg, Plan(train=False, weights=args.checkpoint, weights_key="--checkpoint", transfer=False,
                            allow_unsafe_pickle=args.allow_unsafe_pickle, images=[args.image], outputs=[args.out]))
        model = load_model(args.config, args.checkpoint, list(args.overrides),
                           allow_unsafe_pickle=args.allow_unsafe_pickle)
        detections = detect(model, args.image, cfg)
        names = names_for(args.checkpoint, args.categories)
    threshold = cfg.train.draw_score_threshold if args.threshold is None else args.threshold
    kept = draw_detections(args.image, detections, args.out, threshold=threshold, names=names, scale=args.scale)
    print(f"{len(kept)} detections above {threshold} drawn to {args.out}")
    return kept


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    # overrides may come before, between or after the options
    return parser.parse_intermixed_args(list(argv) if argv is not None else None)
