"""Train loader throughput (images/s per worker) with the full DETR/DINO augmentation.

Builds shards (no Ray) from a generated COCO-like dataset (640x480 JPEGs), then measures
`build_train_loader` with 0 (in-process), 1 and 2 workers. Baseline in the same run: the
map-style COCO folder dataset (`CocoTrainLoader`, what the official code does: one file
per image) with the same transforms and worker count.

    .venv/bin/python benchmarks/loader.py [--images 240] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shard_build import generate  # noqa: E402  (benchmarks/shard_build.py)

from dino_scale.config import DataConfig  # noqa: E402
from dino_scale.data import build_train_loader  # noqa: E402


def throughput(cfg: DataConfig, batch_size: int, limit: int) -> float:
    loader = build_train_loader(cfg, batch_size=batch_size, rank=0, world_size=1, seed=0)
    iterator = iter(loader)
    next(iterator)  # start-up (worker spawn, first shard) is not throughput
    images, start = 0, time.perf_counter()
    for batch in iterator:
        images += len(batch)
        if images >= limit:
            break
    return images / (time.perf_counter() - start)


def build_shards_without_ray(root: Path, out: Path, samples_per_shard: int = 40) -> None:
    from data_pipeline.annotation_index import load_annotation_index
    from data_pipeline.plan import plan_shards
    from data_pipeline.writer import WriterSettings, write_shard
    from dino_scale.data.manifest import build_manifest, write_manifest
    from dino_scale.data.storage import Storage

    if (out / "manifest.json").exists():
        return
    index = load_annotation_index(str(root / "annotations.json"))
    settings = WriterSettings(str(root / "images"), str(out), [c["id"] for c in index.categories])
    records = [write_shard(task, settings) for task in plan_shards(index, samples_per_shard, seed=0)]
    write_manifest(Storage(str(out)), build_manifest(records, index.categories, {}, {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--measure", type=int, default=60, help="images timed per configuration")
    p.add_argument("--dir", default="/tmp/dino_bench/loader")
    args = p.parse_args()
    root = Path(args.dir) / f"coco_like_{args.images}"
    generate(root, args.images)
    build_shards_without_ray(root, root / "shards")
    common = dict(shuffle_buffer=100, multiprocessing_context="spawn")
    for workers in (0, 1, 2):
        shards = DataConfig(train_shards=str(root / "shards"), num_workers=workers, **common)
        folder = DataConfig(train_coco_images=str(root / "images"),
                            train_coco_annotations=str(root / "annotations.json"), num_workers=workers, **common)
        ours = throughput(shards, args.batch_size, args.measure)
        base = throughput(folder, args.batch_size, args.measure)
        per_worker = ours / max(workers, 1)
        print(f"workers={workers}: shards {ours:6.1f} images/s ({per_worker:.1f} per worker), "
              f"COCO folder baseline {base:6.1f} images/s -> {ours / base:.2f}x")


if __name__ == "__main__":
    main()
