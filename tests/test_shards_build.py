"""The Ray shard builder end to end: coco-mini round trips on disk and on S3, interrupted
builds that resume, and bad input that is counted and skipped."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import build_shards as build_mod
from data_pipeline.build_shards import BuildSettings, build_parser, build_shards, main
from data_synthetic import jpeg_bytes, make_coco
from dino_scale.data.manifest import read_manifest
from dino_scale.data.storage import Storage


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (start-up costs seconds and ~1 GB)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


def read_shards(storage: Storage, manifest: dict) -> dict[int, tuple[bytes, dict, str]]:
    """image id -> (jpg bytes, json meta, shard name) for every sample of every shard."""
    samples = {}
    for shard in manifest["shards"]:
        data = storage.read_bytes(shard["name"])
        assert len(data) == shard["bytes"]
        members = defaultdict(dict)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members[key][ext] = tar.extractfile(member).read()
        assert len(members) == shard["samples"]
        for key, parts in members.items():
            meta = json.loads(parts["json"])
            assert int(key) == meta["image_id"] and meta["image_id"] not in samples
            samples[meta["image_id"]] = (parts["jpg"], meta, shard["name"])
    return samples


def check_round_trip(storage: Storage, coco_dir: Path) -> dict:
    manifest = read_manifest(storage.root, storage.storage_options)
    coco = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    samples = read_shards(storage, manifest)
    assert sorted(samples) == sorted(img["id"] for img in coco["images"])
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for img in coco["images"]:
        jpg, meta, _ = samples[img["id"]]
        assert jpg == (coco_dir / "train2017" / img["file_name"]).read_bytes()  # stored as is
        decoded = Image.open(io.BytesIO(jpg))
        decoded.load()
        assert meta["orig_size"] == meta["size"] == [img["height"], img["width"]] == [decoded.height, decoded.width]
        anns = by_image[img["id"]]
        assert meta["boxes"] == [a["bbox"] for a in anns]  # bit-exact
        assert meta["category_ids"] == [a["category_id"] for a in anns]
        assert meta["iscrowd"] == [a["iscrowd"] for a in anns]
        assert meta["file_name"] == img["file_name"]
    assert manifest["totals"]["samples"] == 80 and manifest["totals"]["boxes"] == 739
    assert manifest["totals"]["crowd_boxes"] == 8
    expected = sorted(({"id": c["id"], "name": c["name"]} for c in coco["categories"]), key=lambda c: c["id"])
    assert manifest["categories"] == expected
    for shard in manifest["shards"]:
        assert storage.sha256(shard["name"]) == shard["sha256"]
    return manifest


def test_parser_and_defaults():
    args = build_parser().parse_args(["--annotations", "a.json", "--images", "s3://b/i", "--output", "o"])
    assert args.samples_per_shard == 1000 and args.ray_address is None and args.verify == "sha256"


def test_coco_mini_round_trip_on_disk(ray_local, coco_mini, tmp_path):
    out = tmp_path / "shards"
    report = main([
        "--annotations", str(coco_mini / "annotations" / "instances_train2017.json"),
        "--images", str(coco_mini / "train2017"), "--output", str(out), "--samples-per-shard", "16",
    ])
    assert report["shards_written"] == 5 and report["shards_skipped"] == 0 and report["dropped"] == {}
    manifest = check_round_trip(Storage(str(out)), coco_mini)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_coco_mini_round_trip_on_s3(ray_local, coco_mini, s3_bucket, tmp_path):
    fs = s3_bucket.fs()
    fs.put(str(coco_mini / "train2017") + "/", f"{s3_bucket.name}/coco/train2017/", recursive=True)
    fs.put_file(str(coco_mini / "annotations" / "instances_train2017.json"), f"{s3_bucket.name}/coco/ann.json")
    settings = BuildSettings(
        annotations=f"{s3_bucket.url}/coco/ann.json", images=f"{s3_bucket.url}/coco/train2017",
        output=f"{s3_bucket.url}/shards", samples_per_shard=30, seed=3, storage_options=s3_bucket.storage_options,
    )
    report = build_shards(settings)
    assert report["shards_written"] == 3 and report["samples"] == 80
    storage = Storage(settings.output, s3_bucket.storage_options)
    check_round_trip(storage, coco_mini)
    for name in ("manifest.json", "build_report.json"):
        text = storage.read_bytes(name).decode()
        assert s3_bucket.storage_options["secret"] not in text and s3_bucket.storage_options["key"] not in text
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket.name}/shards", refresh=True)) == sorted(
        ["manifest.json", "build_report.json"]
        + [f"shard-{i:06d}{ext}" for i in range(3) for ext in (".tar", ".done.json")]
    )
    again = build_shards(settings)  # resume on S3: everything verified and skipped
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_build_resumes_without_redoing_or_duplicating(ray_local, tmp_path):
    make_coco(tmp_path / "src", num_images=60, seed=1)
    out = tmp_path / "out"
    settings = BuildSettings(annotations=str(tmp_path / "src" / "annotations.json"),
                             images=str(tmp_path / "src" / "images"), output=str(out), samples_per_shard=5, seed=11,
                             max_in_flight=2)
    finished = []

    def stop_after_three(record):
        finished.append(record["name"])
        if len(finished) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_shards(settings, on_shard_done=stop_after_three)
    assert not (out / "manifest.json").exists()
    done = sorted(p.name.replace(".done.json", ".tar") for p in out.glob("*.done.json"))
    assert set(finished) <= set(done) and len(done) < 12  # tasks in flight may also have finished
    for name in done:  # every visible shard is complete: its size matches its sidecar
        sidecar = json.loads((out / name.replace(".tar", ".done.json")).read_text())
        assert (out / name).stat().st_size == sidecar["bytes"]
    corrupted, untouched = done[0], done[1:]
    data = bytearray((out / corrupted).read_bytes())
    data[700] ^= 0xFF  # same size, different content: only sha256 verification notices
    (out / corrupted).write_bytes(bytes(data))
    (out / "shard-000011.tar").write_bytes(b"partial tar without sidecar")
    before = {name: (out / name).stat().st_mtime_ns for name in untouched}

    report = build_shards(settings)
    assert report["shards_skipped"] == len(untouched)
    assert report["shards_written"] == 12 - len(untouched)
    assert {name: (out / name).stat().st_mtime_ns for name in untouched} == before
    manifest = read_manifest(str(out))
    samples = read_shards(Storage(str(out)), manifest)
    assert len(samples) == 60 == manifest["totals"]["samples"]
    for shard in manifest["shards"]:
        assert Storage(str(out)).sha256(shard["name"]) == shard["sha256"]

    changed = BuildSettings(**{**settings.__dict__, "seed": 12})  # a different plan redoes everything
    assert build_shards(changed)["shards_skipped"] == 0


@pytest.mark.faults
def test_bad_input_is_counted_and_skipped(ray_local, tmp_path):
    src = tmp_path / "src"
    data = make_coco(src, num_images=12, seed=2)
    images = {img["id"]: img for img in data["images"]}
    ids = sorted(images)
    (src / "images" / images[ids[0]]["file_name"]).unlink()  # missing image
    (src / "images" / images[ids[1]]["file_name"]).write_bytes(b"\xff\xd8 not a jpeg at all")  # corrupt
    good = (src / "images" / images[ids[2]]["file_name"]).read_bytes()
    (src / "images" / images[ids[2]]["file_name"]).write_bytes(good[: len(good) // 2])  # truncated JPEG
    png = io.BytesIO()
    Image.new("RGB", (images[ids[3]]["width"], images[ids[3]]["height"]), (9, 9, 9)).save(png, format="PNG")
    (src / "images" / images[ids[3]]["file_name"]).write_bytes(png.getvalue())  # not JPEG: re-encoded
    target = images[ids[4]]
    w, h = target["width"], target["height"]
    bad_boxes = [
        ([1.0, 1.0, 0.0, 5.0], 1),  # zero width -> degenerate
        ([2.0, 2.0, -3.0, 4.0], 1),  # negative width -> degenerate
        ([w + 5.0, 1.0, 4.0, 4.0], 1),  # entirely outside -> degenerate after clipping
        ([w - 4.0, h - 4.0, 10.0, 10.0], 2),  # sticks out -> clipped, kept
        ([3.0, 3.0, 4.0, 4.0], 77),  # unknown category
        ([3.0, 3.0, 4.0, 4.0], 3),  # fine
    ]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != target["id"]]
    for n, (box, cat) in enumerate(bad_boxes):
        data["annotations"].append({"id": 10_000 + n, "image_id": target["id"], "bbox": box, "category_id": cat,
                                    "iscrowd": 0})
    data["annotations"].append({"id": 20_000, "image_id": 424242, "bbox": [1, 1, 2, 2], "category_id": 1})
    (src / "annotations.json").write_text(json.dumps(data))

    out = tmp_path / "out"
    report = build_shards(BuildSettings(annotations=str(src / "annotations.json"), images=str(src / "images"),
                                        output=str(out), samples_per_shard=4, seed=0))
    assert report["dropped"] == {"annotation_unknown_image_id": 1, "degenerate_box": 3, "missing_image": 1,
                                 "unknown_category": 1, "unreadable_image": 2}
    assert report["notes"]["clipped_box"] == 1 and report["notes"]["reencoded"] == 1
    manifest = read_manifest(str(out))
    assert manifest["dropped"] == report["dropped"] and manifest["totals"]["samples"] == 9
    samples = read_shards(Storage(str(out)), manifest)
    assert sorted(samples) == sorted(ids[3:])
    _, meta, _ = samples[target["id"]]
    assert meta["category_ids"] == [2, 3]
    assert meta["boxes"] == [[w - 4.0, h - 4.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]
    jpg, meta, _ = samples[ids[3]]
    assert Image.open(io.BytesIO(jpg)).format == "JPEG"
    assert meta["size"] == [images[ids[3]]["height"], images[ids[3]]["width"]]


def test_max_side_reencodes_and_keeps_original_size(ray_local, tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    boxes = [[10.0, 20.0, 100.0, 50.0]]
    (src / "images" / "big.jpg").write_bytes(jpeg_bytes(400, 200, boxes, seed=0))
    (src / "images" / "small.jpg").write_bytes(jpeg_bytes(90, 60, [[5.0, 5.0, 10.0, 10.0]], seed=1))
    ann = {"images": [{"id": 1, "file_name": "big.jpg", "width": 400, "height": 200},
                      {"id": 2, "file_name": "small.jpg", "width": 90, "height": 60}],
           "annotations": [{"id": 1, "image_id": 1, "bbox": boxes[0], "category_id": 1},
                           {"id": 2, "image_id": 2, "bbox": [5.0, 5.0, 10.0, 10.0], "category_id": 1}],
           "categories": [{"id": 1, "name": "thing"}]}
    (src / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "out"
    report = build_shards(BuildSettings(annotations=str(src / "ann.json"), images=str(src / "images"),
                                        output=str(out), samples_per_shard=10, max_side=100))
    assert report["notes"] == {"reencoded": 1}
    samples = read_shards(Storage(str(out)), read_manifest(str(out)))
    jpg, meta, _ = samples[1]
    assert meta["orig_size"] == [200, 400] and meta["size"] == [50, 100]
    assert Image.open(io.BytesIO(jpg)).size == (100, 50)
    np.testing.assert_allclose(meta["boxes"], [[2.5, 5.0, 25.0, 12.5]])
    jpg, meta, _ = samples[2]
    assert meta["orig_size"] == meta["size"] == [60, 90]
    assert jpg == (src / "images" / "small.jpg").read_bytes()


@pytest.mark.faults
def test_failing_shard_is_retried_reported_and_resumable(ray_local, tmp_path):
    make_coco(tmp_path / "src", num_images=20, seed=6)
    out = tmp_path / "out"
    (out / "shard-000002.tar").mkdir(parents=True)  # publishing this shard fails with an OSError
    settings = BuildSettings(annotations=str(tmp_path / "src" / "annotations.json"),
                             images=str(tmp_path / "src" / "images"), output=str(out), samples_per_shard=5,
                             max_retries=1)
    with pytest.raises(build_mod.BuildError, match="1 of 4 shards failed"):
        build_shards(settings)
    report = json.loads((out / "build_report.json").read_text())
    assert report["shards_written"] == 3 and list(report["failures"]) == ["shard-000002.tar"]
    assert not (out / "manifest.json").exists()
    (out / "shard-000002.tar").rmdir()
    report = build_shards(settings)
    assert (report["shards_written"], report["shards_skipped"]) == (1, 3)
    assert read_manifest(str(out))["totals"]["samples"] == 20


@pytest.mark.faults
def test_store_unreachable_at_the_end_is_a_clear_error_and_resumable(ray_local, tmp_path, monkeypatch):
    """The object store goes away after the shards are written, while the report and the
    manifest are published: a BuildError saying to re-run, never a bare traceback."""
    from botocore.exceptions import EndpointConnectionError

    make_coco(tmp_path / "src", num_images=12, seed=8)
    out = tmp_path / "out"
    settings = BuildSettings(annotations=str(tmp_path / "src" / "annotations.json"),
                             images=str(tmp_path / "src" / "images"), output=str(out), samples_per_shard=4)
    write_bytes = Storage.write_bytes

    def unreachable(self, name, data):
        if name in ("build_report.json", "manifest.json"):
            raise EndpointConnectionError(endpoint_url=f"http://127.0.0.1:9/bucket/{name}")
        return write_bytes(self, name, data)

    monkeypatch.setattr(Storage, "write_bytes", unreachable)
    with pytest.raises(build_mod.BuildError, match="3 of 3 shards are finished and kept, re-run the same command"):
        build_shards(settings)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(Storage, "write_bytes", write_bytes)
    report = build_shards(settings)
    assert (report["shards_written"], report["shards_skipped"]) == (0, 3)
    assert read_manifest(str(out))["totals"]["samples"] == 12
