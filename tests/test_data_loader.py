"""The streaming train loader: rank/worker splits, resampled epochs, exact resume, bad
samples counted, spawned workers over s3:// shards."""

from __future__ import annotations

import dataclasses
import json
import math
import tarfile
from collections import Counter

import pytest
import torch

from data_synthetic import annotations_by_image, build_shards_inline, make_coco
from dino_scale.config import DataConfig
from dino_scale.data import BadDataError, Batch, build_train_loader
from dino_scale.data.manifest import read_manifest
from dino_scale.data.stream import IndexShuffler, finite_segments
from faults.shards import rewrite_shard

NUM_IMAGES = 46


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    data = make_coco(root / "src", num_images=NUM_IMAGES, seed=5)
    manifest = build_shards_inline(root / "src", str(root / "shards"), samples_per_shard=6, seed=1)
    return root, data, manifest


def small_cfg(shards: str, **overrides) -> DataConfig:
    base = dict(train_shards=shards, num_workers=0, multiprocessing_context="fork", shuffle_buffer=8,
                train_scales=[48, 56, 64], train_max_size=100, crop_scales=[40, 48], crop_min_size=24,
                crop_max_size=40)
    return DataConfig(**{**base, **overrides})


def image_ids(batches: list[Batch]) -> list[int]:
    return [int(t["image_id"]) for b in batches for t in b.targets]


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.masks, y.masks)
        assert len(x.targets) == len(y.targets)
        for s, t in zip(x.targets, y.targets):
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)


def test_finite_segments_partition_every_sample_once():
    shards = [(f"s{i}", n) for i, n in enumerate([5, 7, 1, 6, 0, 9, 4])]
    total = sum(n for _, n in shards)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            for batch in (1, 2, 4):
                seen = Counter()
                for rank in range(world):
                    for worker in range(workers):
                        for seg in finite_segments(shards, 3, 1, rank, world, worker, workers, batch):
                            seen.update((seg.shard, i) for i in range(seg.start, seg.stop))
                assert sum(seen.values()) == total and set(seen.values()) == {1}


def test_index_shuffler_is_a_bounded_permutation():
    order = list(IndexShuffler(100, 10, seed=3))
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert all(index <= position + 10 for position, index in enumerate(order))  # read-ahead bounded
    assert list(IndexShuffler(100, 10, seed=3)) == order


def test_two_ranks_two_workers_read_every_sample_once(dataset):
    root, data, manifest = dataset
    ids = []
    for rank in range(2):
        cfg = small_cfg(str(root / "shards"), num_workers=2)
        loader = build_train_loader(cfg, batch_size=3, rank=rank, world_size=2, seed=0)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.stats()["samples_read"] == sum(len(b) for b in batches)
        ids += image_ids(batches)
    assert sorted(ids) == sorted(img["id"] for img in data["images"])


def test_batches_hold_the_contract(dataset):
    root, data, _ = dataset
    anns = annotations_by_image(data)
    loader = build_train_loader(small_cfg(str(root / "shards")), batch_size=4, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.float32 and batch.images.shape[:2] == (4, 3)
    assert batch.masks.dtype == torch.bool and batch.masks.shape == (4, *batch.images.shape[2:])
    for i, t in enumerate(batch.targets):
        h, w = t["size"].tolist()
        assert (~batch.masks[i]).sum() == h * w and not batch.masks[i, :h, :w].any()
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert t["boxes"].shape == (len(t["labels"]), 4)
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        image_id = int(t["image_id"])
        image = next(img for img in data["images"] if img["id"] == image_id)
        assert t["orig_size"].tolist() == [image["height"], image["width"]]
        # crowd boxes leave the training targets; a crop may remove others
        non_crowd = Counter(a["category_id"] for a in anns[image_id] if not a["iscrowd"])
        assert not Counter(t["labels"].tolist()) - non_crowd


def test_resampled_mode_has_a_fixed_epoch_length(dataset):
    root, _, _ = dataset
    cfg = small_cfg(str(root / "shards"), mode="resampled", samples_per_epoch=40, num_workers=2)
    loader = build_train_loader(cfg, batch_size=3, rank=1, world_size=2, seed=0)
    assert len(loader) == math.ceil(20 / 3)
    epoch0 = list(loader)
    assert [len(b) for b in epoch0] == [3, 3, 3, 3, 3, 2, 3]  # workers: 3+3+3+3 and 3+3+2, round robin
    assert sum(len(b) for b in epoch0) == 20 and len(epoch0) == len(loader)
    epoch1 = list(loader)  # iterating again moves on to the next epoch
    assert loader.epoch == 1 and sum(len(b) for b in epoch1) == 20
    assert image_ids(epoch0) != image_ids(epoch1)


@pytest.mark.parametrize("mode,consumed", [("finite", 1), ("finite", 4), ("resampled", 3)])
def test_resume_continues_exactly(dataset, mode, consumed):
    root, _, _ = dataset
    cfg = small_cfg(str(root / "shards"), num_workers=2, mode=mode, samples_per_epoch=30)
    kwargs = dict(batch_size=3, rank=0, world_size=1, seed=7, epoch=2)
    reference = list(build_train_loader(cfg, **kwargs))
    first = build_train_loader(cfg, **kwargs)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == consumed:
            break
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint as plain data
    resumed = build_train_loader(cfg, **{**kwargs, "epoch": 0})
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's epoch loop calls this: it must keep the position
    tail = list(resumed)
    assert_same_batches(head + tail, reference)
    assert resumed.stats()["samples_read"] == sum(len(b) for b in reference)


def test_state_from_other_settings_is_refused(dataset):
    root, _, _ = dataset
    cfg = small_cfg(str(root / "shards"))
    state = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=7).state_dict()
    other = build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=7)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_train_loader(small_cfg(str(tmp_path)), batch_size=2, rank=0, world_size=1, seed=0)


@pytest.mark.faults
def test_bad_samples_are_skipped_counted_and_bounded(tmp_path):
    make_coco(tmp_path / "src", num_images=24, seed=9)
    manifest = build_shards_inline(tmp_path / "src", str(tmp_path / "shards"), samples_per_shard=6)
    shards = [tmp_path / "shards" / s["name"] for s in manifest["shards"]]

    seen: list[str] = []
    count = [0]

    def corrupt_first_jpeg(key, parts):
        if not seen:
            seen.append(key)
            parts["jpg"] = parts["jpg"][: len(parts["jpg"]) // 3]  # truncated JPEG
        return parts

    def bad_boxes(key, parts):
        meta = json.loads(parts["json"])
        count[0] += 1
        if count[0] == 1:
            meta["boxes"] = [[1.0, 1.0, float("nan"), 3.0]]
        elif count[0] == 2:
            meta["boxes"] = [[1.0, 1.0, -4.0, 3.0]]
        else:
            return parts
        meta["category_ids"], meta["iscrowd"] = [1], [0]
        parts["json"] = json.dumps(meta).encode()
        return parts

    rewrite_shard(shards[0], corrupt_first_jpeg)
    rewrite_shard(shards[1], bad_boxes)
    with tarfile.open(shards[2]) as tar:  # cut shard 2 inside the data of its 3rd sample
        third_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    shards[2].write_bytes(shards[2].read_bytes()[: third_jpg.offset_data + 10])

    cfg = small_cfg(str(tmp_path / "shards"), max_bad_fraction=1.0)
    loader = build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    ids = image_ids(list(loader))
    stats = loader.stats()
    assert stats["reasons"] == {"undecodable_image": 1, "bad_boxes": 2, "truncated_tar": 4}
    assert stats["samples_read"] == 24 and stats["samples_skipped"] == 7 and len(ids) == 17 == len(set(ids))

    shards[3].unlink()  # a shard the manifest names but storage lacks
    loader = build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    assert len(image_ids(list(loader))) == 17 - 6
    assert loader.stats()["reasons"]["shard_unreadable"] == 6

    strict = build_train_loader(dataclasses.replace(cfg, max_bad_fraction=0.1, min_samples_for_bad_fraction=10),
                                batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(BadDataError, match=r"more than data.max_bad_fraction=10.00%"):
        list(strict)


def test_spawned_workers_stream_s3_shards(s3_bucket, tmp_path):
    make_coco(tmp_path / "src", num_images=20, seed=4)
    url = f"{s3_bucket.url}/train"
    build_shards_inline(tmp_path / "src", url, samples_per_shard=4, storage_options=s3_bucket.storage_options)
    assert read_manifest(url, s3_bucket.storage_options)["totals"]["samples"] == 20
    cfg = small_cfg(url, num_workers=2, multiprocessing_context="spawn", storage_options=s3_bucket.storage_options)
    loader = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=0)
    batches = list(loader)
    assert sorted(image_ids(batches)) == sorted(range(1000, 1000 + 7 * 20, 7))
    assert loader.stats()["samples_skipped"] == 0


def test_coco_mini_every_sample_through_the_loader(coco_mini, tmp_path):
    raw = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    build_shards_inline(coco_mini, str(tmp_path / "shards"), samples_per_shard=16,
                        annotations=coco_mini / "annotations" / "instances_train2017.json",
                        images=coco_mini / "train2017")
    cfg = small_cfg(str(tmp_path / "shards"), train_scales=[96, 128], train_max_size=200)
    loader = build_train_loader(cfg, batch_size=8, rank=0, world_size=1, seed=0)
    targets = [t for batch in loader for t in batch.targets]
    assert sorted(int(t["image_id"]) for t in targets) == sorted(img["id"] for img in raw["images"])
    sizes = {img["id"]: [img["height"], img["width"]] for img in raw["images"]}
    for t in targets:
        image_id = int(t["image_id"])
        assert t["orig_size"].tolist() == sizes[image_id]
        non_crowd = Counter(a["category_id"] for a in raw["annotations"]
                            if a["image_id"] == image_id and not a["iscrowd"])
        assert not Counter(t["labels"].tolist()) - non_crowd
    assert loader.stats()["samples_skipped"] == 0


def test_train_shards_may_name_the_manifest_itself(dataset):
    root, _, _ = dataset
    by_dir = build_train_loader(small_cfg(str(root / "shards") + "/"), batch_size=5, rank=0, world_size=1, seed=0)
    by_file = build_train_loader(small_cfg(str(root / "shards" / "manifest.json")), batch_size=5, rank=0,
                                 world_size=1, seed=0)
    assert len(by_dir) == len(by_file) == math.ceil(NUM_IMAGES / 5)
    assert image_ids(list(by_dir)) == image_ids(list(by_file))


def _take(loader, batches: int) -> list[Batch]:
    """The first `batches` batches; the loader counts a batch as delivered when it yields it."""
    taken = []
    if batches:
        for batch in loader:
            taken.append(batch)
            if len(taken) == batches:
                break
    return taken


def _layout_states(cfg, layout: tuple[int, int], reads: list[int], previous=None):
    """Every rank of a (ranks, batch size) layout reads reads[r] batches (resuming from the
    previous layout's states when given); returns (image ids read, the ranks' states)."""
    world, batch_size = layout
    ids, states = [], []
    for rank in range(world):
        loader = build_train_loader(cfg, batch_size=batch_size, rank=rank, world_size=world, seed=3, epoch=1)
        if previous is not None:
            loader.resume_from_ranks(previous)
        ids += image_ids(_take(loader, reads[rank]) if reads[rank] >= 0 else list(loader))
        states.append(json.loads(json.dumps(loader.state_dict())))
    return ids, states


def test_elastic_resume_reads_the_rest_of_the_epoch_exactly_once(dataset):
    """2 ranks x 2 workers -> 3 ranks x 1 worker (other batch size) -> 1 rank x 2 workers:
    every image of the epoch exactly once, whatever was in the shuffle buffers."""
    root, data, _ = dataset
    shards = str(root / "shards")
    ids_a, states = _layout_states(small_cfg(shards, num_workers=2), (2, 3), [2, 3])
    ids_b, states = _layout_states(small_cfg(shards, num_workers=1), (3, 2), [1, 2, 0], states)
    ids_c, _ = _layout_states(small_cfg(shards, num_workers=2), (1, 4), [-1], states)
    assert len(ids_a) == 15 and len(ids_b) == 6
    assert sorted(ids_a + ids_b + ids_c) == sorted(img["id"] for img in data["images"])
    # the same layout change twice continues identically
    again, _ = _layout_states(small_cfg(shards, num_workers=2), (1, 4), [-1], states)
    assert again == ids_c


def test_elastic_resume_in_resampled_mode_draws_the_remaining_count(dataset):
    root, _, _ = dataset
    cfg = small_cfg(str(root / "shards"), num_workers=2, mode="resampled", samples_per_epoch=30)
    ids_a, states = _layout_states(cfg, (2, 3), [2, 1])
    ids_b, _ = _layout_states(cfg, (1, 4), [-1], states)
    ids_b2, _ = _layout_states(cfg, (1, 4), [-1], states)
    assert len(ids_a) == 9 and len(ids_b) == 30 - 9 and ids_b == ids_b2


def test_elastic_resume_of_a_coco_folder_and_refusals(dataset):
    root, data, _ = dataset
    cfg = small_cfg(None, train_coco_images=str(root / "src" / "images"),
                    train_coco_annotations=str(root / "src" / "annotations.json"))
    ids_a, states = _layout_states(cfg, (2, 3), [2, 4])
    ids_b, _ = _layout_states(cfg, (1, 5), [-1], states)
    assert sorted(ids_a + ids_b) == sorted(img["id"] for img in data["images"])
    other_seed = build_train_loader(cfg, batch_size=5, rank=0, world_size=1, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other_seed.resume_from_ranks(states)
    with pytest.raises(ValueError, match="every rank"):
        other_seed.resume_from_ranks(states[1:])
