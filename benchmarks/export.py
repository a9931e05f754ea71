"""ONNX Runtime (CPU) vs eager PyTorch latency of an exported DINO, in one run.

    .venv/bin/python benchmarks/export.py                      # R50-4scale, 512x640, 2 threads
    .venv/bin/python benchmarks/export.py --config configs/finetune_coco_swinl.yaml --height 384 --width 384

Builds the config's model with random weights, exports it as `python -m dino_scale.export onnx
--dynamic` does (standard-op MSDA, post-processing in the graph) into a temp dir, then runs one
padded batch of random images through both, interleaved after a warm-up, with the same number
of threads: eager is the model + PostProcess with its configured MSDA op (the native op),
ONNX Runtime the exported file on the CPU provider. Prints medians, the ratio eager / ONNX
Runtime, the export time, the largest score difference, and the CPU's features.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dino_scale.config import load_config
from dino_scale.export.graph import example_inputs, export_onnx
from dino_scale.export.runtime import OnnxDetector
from dino_scale.hardware import cpu_features_line
from dino_scale.models import PostProcess, build_dino


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dino_r50_4scale_coco.yaml")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg.model.backbone.pretrained_path = None
    torch.manual_seed(0)
    model = build_dino(cfg.model).eval()
    postprocess = PostProcess(cfg.model.num_select)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        export_onnx(model, path, num_select=cfg.model.num_select, height=args.height, width=args.width,
                    dynamic=True)
        export_seconds = time.perf_counter() - start
        detector = OnnxDetector(path, threads=args.threads)

        images, masks, sizes = example_inputs(args.batch, args.height, args.width)
        masks[:, :, args.width * 7 // 8:] = True  # some padding, as a batch of mixed sizes has

        def eager() -> np.ndarray:
            with torch.no_grad():
                return postprocess(model(images, masks), sizes)[0]["scores"].numpy()

        def onnx_runtime() -> np.ndarray:
            return detector(images, masks, sizes)["scores"][0]

        score_diff = float(np.abs(eager() - onnx_runtime()).max())  # also the warm-up
        times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
        for _ in range(args.repeats):
            for name, run in (("eager", eager), ("onnxruntime", onnx_runtime)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    eager_s, ort_s = statistics.median(times["eager"]), statistics.median(times["onnxruntime"])
    print(f"{args.config}: batch {args.batch} of {args.height}x{args.width}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"eager (msda {cfg.model.msda_impl}): {eager_s * 1000:.0f} ms   onnxruntime CPU: {ort_s * 1000:.0f} ms   "
          f"eager / onnxruntime = {eager_s / ort_s:.2f}x")
    print(f"export {export_seconds:.0f} s; max score difference {score_diff:.2g}")
    print(cpu_features_line())


if __name__ == "__main__":
    main()
