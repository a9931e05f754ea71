"""Shard-building throughput with 1 and 2 Ray workers (local Ray, same data, same run).

Generates a COCO-like dataset (640x480 JPEGs, ~7 boxes each) under --dir once, then
builds shards from it with `num_cpus=1` and `num_cpus=2` (fresh output each time) and
prints images/s of the shard phase and the 2-vs-1 ratio. `--max-side` adds re-encoding.

    .venv/bin/python benchmarks/shard_build.py [--images 600] [--max-side 512]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def generate(root: Path, num_images: int, seed: int = 0) -> None:
    if (root / "annotations.json").exists():
        return
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    base = np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None].repeat(480, 0).repeat(3, 2)
    for i in range(num_images):
        image = Image.fromarray(np.roll(base, rng.randint(0, 639), axis=1))
        draw = ImageDraw.Draw(image)
        for _ in range(7):
            w, h = rng.randint(20, 200), rng.randint(20, 200)
            x, y = rng.randint(0, 640 - w), rng.randint(0, 480 - h)
            draw.rectangle([x, y, x + w, y + h], fill=tuple(rng.randint(0, 255) for _ in range(3)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "bbox": [x, y, w, h],
                         "category_id": rng.randint(1, 80), "iscrowd": 0})
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (root / "images" / f"{i + 1:08d}.jpg").write_bytes(buffer.getvalue())
        images.append({"id": i + 1, "file_name": f"{i + 1:08d}.jpg", "width": 640, "height": 480})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def run(root: Path, num_cpus: int, max_side: int | None, samples_per_shard: int) -> dict:
    import ray

    from data_pipeline.build_shards import BuildSettings, build_shards

    out = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=root))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=128 << 20,
             log_to_driver=False)
    try:
        report = build_shards(BuildSettings(annotations=str(root / "annotations.json"), images=str(root / "images"),
                                            output=str(out), samples_per_shard=samples_per_shard, max_side=max_side,
                                            max_in_flight=2 * num_cpus))
    finally:
        ray.shutdown()
        shutil.rmtree(out)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--samples-per-shard", type=int, default=50)
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--dir", default="/tmp/dino_bench/shard_build")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(args.dir) / f"coco_like_{args.images}"
    generate(root, args.images)
    results = {}
    for cpus in (1, 2):
        report = run(root, cpus, args.max_side, args.samples_per_shard)
        results[cpus] = report["images_per_second_written"]
        print(f"{cpus} Ray worker(s): {report['samples_written']} images in {report['seconds']:.1f} s "
              f"(index + shards) -> {results[cpus]:.1f} images/s"
              + (f", max_side={args.max_side}" if args.max_side else ""))
    print(f"2 workers vs 1: {results[2] / results[1]:.2f}x (machine has {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
