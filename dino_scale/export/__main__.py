"""`python -m dino_scale.export onnx --config C --checkpoint CKPT --out model.onnx
[--opset N] [--height H --width W | --dynamic] [--msda {gather,custom}] [--skip-optimizer]
[key.sub=value ...]`

Bad inputs (a checkpoint that does not fit the config, an unsupported opset, an output that
cannot be written) print one line to stderr and exit with status 2, leaving no file behind.
"""

from __future__ import annotations

import argparse
import json

from dino_scale.config import config_to_dict, load_config
from dino_scale.data.categories import read_categories
from dino_scale.errors import exit_process, run_command
from dino_scale.export.graph import DEFAULT_OPSET, MSDA_FORMS, SUPPORTED_OPSETS, ExportError, check_opset, export_onnx
from dino_scale.export.runtime import CATEGORIES_KEY, CONFIG_KEY
from dino_scale.weights import load_model
from dino_scale.weights.errors import CheckpointError
from dino_scale.weights.safetensors import is_safetensors, read_metadata

# the example input of a --dynamic export (any size works; it only has to exercise the graph)
DYNAMIC_EXAMPLE_SIZE = (512, 640)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dino_scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["onnx"],
                        help="onnx: an ONNX graph with post-processing (scores, labels, xyxy boxes)")
    onnx = parser
    onnx.add_argument("--config", required=True, help="YAML config of the model")
    onnx.add_argument("--checkpoint", required=True, help="dino-scale .safetensors or official DINO .pth")
    onnx.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    opsets = f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset {opsets} (default {DEFAULT_OPSET})")
    onnx.add_argument("--height", type=int, default=None,
                      help="fixed input height (with --width; the batch stays symbolic)")
    onnx.add_argument("--width", type=int, default=None, help="fixed input width (with --height)")
    onnx.add_argument("--dynamic", action="store_true",
                      help="batch, height and width symbolic (the default when no size is given; "
                           "not for Swin backbones)")
    onnx.add_argument("--msda", choices=MSDA_FORMS, default="gather",
                      help="deformable attention as standard ops (gather) or one custom node per call "
                           "(custom: domain dino_scale, op MSDeformAttn, for a TensorRT plugin)")
    onnx.add_argument("--skip-optimizer", action="store_true",
                      help="skip onnxscript's graph optimizer (most of a Swin-L export's time); ONNX Runtime "
                           "optimizes the graph again when it loads it")
    onnx.add_argument("--categories", default=None,
                      help="COCO JSON / manifest whose class names go into the file's metadata "
                           "(default: the checkpoint's metadata)")
    onnx.add_argument("--allow-unsafe-pickle", action="store_true")
    onnx.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def run_onnx(args: argparse.Namespace) -> None:
    fixed = args.height is not None or args.width is not None
    if fixed and (args.height is None or args.width is None):
        raise ExportError("--height and --width go together")
    if fixed and args.dynamic:
        raise ExportError("--dynamic and a fixed --height/--width exclude each other")
    check_opset(args.opset)
    cfg = load_config(args.config, list(args.overrides))
    try:
        model = load_model(args.config, args.checkpoint, list(args.overrides),
                           allow_unsafe_pickle=args.allow_unsafe_pickle)
        categories = _categories(args.checkpoint, args.categories)
    except CheckpointError as exc:
        raise ExportError(f"{exc} (config {args.config})") from exc
    height, width = (args.height, args.width) if fixed else DYNAMIC_EXAMPLE_SIZE
    metadata = {CONFIG_KEY: json.dumps(config_to_dict(cfg)),
                CATEGORIES_KEY: json.dumps(categories)}
    result = export_onnx(model, args.out, num_select=cfg.model.num_select, height=height, width=width,
                         dynamic=not fixed, opset=args.opset, msda=args.msda, metadata=metadata,
                         optimize=not args.skip_optimizer)
    print(f"wrote {result.path} (opset {result.opset}, msda {result.msda}, inputs "
          + ", ".join(f"{name} {dims}" for name, dims in result.dynamic_axes.items()) + ")")


def _categories(checkpoint: str, categories_file: str | None) -> list[dict]:
    """`[{"id", "name"}]` from a COCO JSON / manifest, else the checkpoint's metadata, else []."""
    if categories_file:
        return read_categories(categories_file)
    if is_safetensors(checkpoint):
        return read_metadata(checkpoint).get("categories") or []
    return []


def main(argv: list[str] | None = None) -> int:
    run_onnx(build_parser().parse_intermixed_args(argv))
    return 0


if __name__ == "__main__":
    exit_process(run_command(main, prog="python -m dino_scale.export"))
