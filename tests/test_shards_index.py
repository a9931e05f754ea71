"""Annotation index (streamed COCO JSON) and the deterministic shard plan."""

import json

import numpy as np
import pytest

from data_pipeline.annotation_index import ijson_backend, load_annotation_index
from data_pipeline.plan import plan_shards


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _dataset():
    images = [{"id": i, "file_name": f"d/{i}.jpg", "width": 100 + i, "height": 50 + i} for i in (30, 10, 20, 40)]
    anns = [
        {"id": 1, "image_id": 20, "bbox": [1.5, 2.25, 3.0, 4.0], "category_id": 3, "iscrowd": 0},
        {"id": 2, "image_id": 10, "bbox": [0.1, 0.2, 5.5, 6.5], "category_id": 1, "iscrowd": 1,
         "segmentation": {"counts": [1, 2], "size": [3, 3]}},
        {"id": 3, "image_id": 20, "bbox": [7, 8, 9, 10], "category_id": 2},
        {"id": 4, "image_id": 999, "bbox": [1, 1, 1, 1], "category_id": 2},  # unknown image
        {"id": 5, "image_id": 30, "category_id": 2},  # no bbox
    ]
    cats = [{"id": 3, "name": "c"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return images, anns, cats


def test_uses_ijson_c_backend():
    assert ijson_backend().__name__.endswith("yajl2_c")


@pytest.mark.parametrize("key_order", [("images", "annotations", "categories"),
                                       ("categories", "annotations", "images")])
def test_index_matches_json_whatever_the_key_order(tmp_path, key_order):
    images, anns, cats = _dataset()
    parts = {"images": images, "annotations": anns, "categories": cats}
    data = {"info": {"x": [1, {"images": []}]}, **{k: parts[k] for k in key_order}}
    index = load_annotation_index(_write(tmp_path / "a.json", data))
    assert index.image_ids.tolist() == [10, 20, 30, 40]
    assert index.widths.tolist() == [110, 120, 130, 140] and index.heights.tolist() == [60, 70, 80, 90]
    assert [index.file_name(r) for r in range(4)] == ["d/10.jpg", "d/20.jpg", "d/30.jpg", "d/40.jpg"]
    assert index.ann_start.tolist() == [0, 1, 3, 3, 3]
    assert index.boxes.tolist() == [[0.1, 0.2, 5.5, 6.5], [1.5, 2.25, 3.0, 4.0], [7, 8, 9, 10]]
    assert index.category_ids.tolist() == [1, 3, 2] and index.iscrowd.tolist() == [1, 0, 0]
    assert index.categories == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    assert index.dropped == {"annotation_unknown_image_id": 1, "annotation_without_bbox": 1}


def test_duplicate_image_ids_are_dropped_and_counted(tmp_path):
    images, anns, cats = _dataset()
    images.append(dict(images[0]))
    path = _write(tmp_path / "a.json", {"images": images, "annotations": anns, "categories": cats})
    index = load_annotation_index(path)
    assert index.num_images == 4 and index.dropped["duplicate_image_id"] == 1


def test_plan_is_deterministic_and_covers_every_image_once(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(1, 104)]
    anns = [{"id": i, "image_id": 1 + i % 103, "bbox": [0, 0, 1 + i % 5, 2], "category_id": 1} for i in range(300)]
    path = _write(tmp_path / "a.json", {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]})
    index = load_annotation_index(path)
    plan_a = plan_shards(index, 10, seed=7)
    plan_b = plan_shards(load_annotation_index(path), 10, seed=7)
    plan_c = plan_shards(index, 10, seed=8)
    assert [t.name for t in plan_a] == [f"shard-{i:06d}.tar" for i in range(11)]
    assert [t.image_ids.tolist() for t in plan_a] == [t.image_ids.tolist() for t in plan_b]
    assert [t.digest for t in plan_a] == [t.digest for t in plan_b]
    assert [t.image_ids.tolist() for t in plan_a] != [t.image_ids.tolist() for t in plan_c]
    ids = np.concatenate([t.image_ids for t in plan_a])
    assert sorted(ids.tolist()) == list(range(1, 104))
    for task in plan_a:  # each task carries exactly its images' boxes
        for i, image_id in enumerate(task.image_ids):
            expected = [[0, 0, 1 + a % 5, 2] for a in range(300) if 1 + a % 103 == image_id]
            assert task.boxes[task.ann_start[i] : task.ann_start[i + 1]].tolist() == expected
    assert plan_shards(index, 10, seed=7, settings_fingerprint={"max_side": 5})[0].digest != plan_a[0].digest


def test_index_cache_round_trips_and_notices_a_changed_source(tmp_path):
    from data_pipeline.annotation_index import load_annotation_index_cached

    images, anns, cats = _dataset()
    path = _write(tmp_path / "a.json", {"images": images, "annotations": anns, "categories": cats})
    cache = str(tmp_path / "cache" / "index.npz")
    fresh = load_annotation_index_cached(path, cache=cache)
    cached = load_annotation_index_cached(path, cache=cache)
    for name in ("image_ids", "widths", "heights", "name_offsets", "ann_start", "boxes", "category_ids", "iscrowd"):
        a, b = getattr(fresh, name), getattr(cached, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert cached.name_blob == fresh.name_blob and cached.categories == fresh.categories
    assert cached.dropped == fresh.dropped
    anns[0]["bbox"] = [9.0, 9.0, 9.0, 9.0]
    _write(tmp_path / "a.json", {"images": images, "annotations": anns, "categories": cats, "pad": "x" * 10})
    changed = load_annotation_index_cached(path, cache=cache)
    assert changed.boxes.tolist()[1] == [9.0, 9.0, 9.0, 9.0]
