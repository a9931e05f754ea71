"""Annotation index on an Objects365-v2-sized COCO JSON: time and peak RSS.

Generates (once, cached) a synthetic file with the shape of O365 v2 train — 1,742,289
images, ~25M boxes, 365 categories, O365's per-annotation fields — then indexes it in a
fresh process and reports wall time and peak RSS (the indexing process plus its helper
process). Baseline, measured in the same run on a 1/20 slice of the same data: `json.load`
(what pycocotools does) vs our index.

    .venv/bin/python benchmarks/annotation_index.py [--images 1742289] [--boxes 25000000]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "index":
    from data_pipeline.annotation_index import load_annotation_index
    index = load_annotation_index(sys.argv[2])
    n = index.num_annotations
else:
    import json
    with open(sys.argv[2]) as f:
        n = len(json.load(f)["annotations"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(time.perf_counter() - t, peak * 1024, n)
"""


def generate(path: Path, num_images: int, num_boxes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    per_image = num_boxes / num_images
    with open(tmp, "w", buffering=16 << 20) as f:
        f.write('{"info": {"description": "synthetic Objects365 v2 shape"}, "licenses": [], "images": [')
        for i in range(num_images):
            sep = "," if i else ""
            f.write(f'{sep}{{"height": 512, "id": {i + 1}, "license": 5, "width": 683, '
                    f'"file_name": "images/v2/patch{i % 51}/objects365_v2_{i + 1:08d}.jpg", '
                    f'"url": ""}}')
        f.write('], "annotations": [')
        ann_id, written = 0, 0
        for i in range(num_images):
            count = int((i + 1) * per_image) - int(i * per_image)
            parts = []
            for _ in range(count):
                ann_id += 1
                x, y = rng.random() * 600, rng.random() * 450
                w, h = rng.random() * 80 + 1, rng.random() * 60 + 1
                parts.append(
                    f'{{"id": {ann_id}, "iscrowd": 0, "isfake": 0, "area": {w * h:.4f}, '
                    f'"isreflected": 0, "bbox": [{x:.2f}, {y:.2f}, {w:.2f}, {h:.2f}], '
                    f'"image_id": {i + 1}, "category_id": {rng.randint(1, 365)}}}'
                )
            if parts:
                f.write(("," if written else "") + ",".join(parts))
                written += len(parts)
        f.write('], "categories": [')
        f.write(",".join(f'{{"name": "class{c}", "id": {c}}}' for c in range(1, 366)))
        f.write("]}")
    os.replace(tmp, path)


def measure(mode: str, path: Path) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    seconds, rss, n = out.stdout.split()
    return float(seconds), int(rss), int(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1_742_289)
    p.add_argument("--boxes", type=int, default=25_000_000)
    p.add_argument("--dir", default="/tmp/dino_bench")
    args = p.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    full = directory / f"o365_synth_{args.images}_{args.boxes}.json"
    small = directory / f"o365_synth_{args.images // 20}_{args.boxes // 20}.json"
    for path, images, boxes in ((small, args.images // 20, args.boxes // 20), (full, args.images, args.boxes)):
        if not path.exists():
            t = time.perf_counter()
            generate(path, images, boxes)
            print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    gib = 1 << 30
    t_json, rss_json, n_small = measure("json", small)
    t_index_small, rss_index_small, _ = measure("index", small)
    print(f"1/20 slice ({small.stat().st_size / 1e9:.2f} GB, {n_small} boxes):")
    print(f"  json.load        {t_json:7.1f} s  peak RSS {rss_json / gib:5.2f} GiB")
    print(f"  annotation index {t_index_small:7.1f} s  peak RSS {rss_index_small / gib:5.2f} GiB"
          f"  -> {t_json / t_index_small:.2f}x faster, {rss_json / rss_index_small:.1f}x less memory")
    t_full, rss_full, n_full = measure("index", full)
    print(f"full ({full.stat().st_size / 1e9:.2f} GB, {args.images} images, {n_full} boxes):")
    print(f"  annotation index {t_full:7.1f} s  peak RSS {rss_full / gib:5.2f} GiB (target < 4 GiB)"
          f"  {n_full / t_full / 1e6:.2f} M boxes/s")
    print(f"  json.load extrapolated from the slice: ~{rss_json * 20 / gib:.0f} GiB")


if __name__ == "__main__":
    main()
