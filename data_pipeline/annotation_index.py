"""Stream a COCO-format annotation file into compact numpy arrays.

Objects365 v2's train file (1.74M images, ~25M boxes, several GB) does not fit through
`json.load` + pycocotools on an ordinary machine. Here ijson's yajl2 C backend streams the
file and each record is reduced at once to a few numbers in `array.array` buffers (8 bytes
per number instead of a Python dict per annotation). Peak memory is about the arrays
themselves plus one sort of the annotations by image id.
"""

from __future__ import annotations

import array
import concurrent.futures
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ijson
import numpy as np

from dino_scale.data.storage import filesystem, redact_url, split_url
from dino_scale.errors import UserError
from dino_scale.io import atomic_write_with
from dino_scale.log import get_logger

log = get_logger("data_pipeline.annotation_index")

READ_CHUNK = 16 << 20
PARALLEL_MIN_BYTES = 64 << 20


def ijson_backend() -> Any:
    """The fastest ijson backend available (yajl2_c), falling back with a warning."""
    try:
        import ijson.backends.yajl2_c as backend

        return backend
    except ImportError:  # pragma: no cover - depends on the wheel
        log.warning("ijson C backend (yajl2_c) unavailable; falling back to %s (much slower)", ijson.backend)
        return ijson


@dataclass
class AnnotationIndex:
    """Images sorted by id; their annotations sorted by image id (CSR layout).

    `ann_start[i]:ann_start[i+1]` indexes the annotations of image row `i`.
    Boxes are COCO `[x, y, w, h]` in the pixels of the annotated image size.
    """

    image_ids: np.ndarray  # int64 [I]
    widths: np.ndarray  # int32 [I]
    heights: np.ndarray  # int32 [I]
    name_blob: bytes  # utf-8 file names, concatenated
    name_offsets: np.ndarray  # int64 [I + 1]
    ann_start: np.ndarray  # int64 [I + 1]
    boxes: np.ndarray  # float64 [A, 4]
    category_ids: np.ndarray  # int32 [A]
    iscrowd: np.ndarray  # uint8 [A]
    categories: list[dict[str, Any]]  # [{"id", "name"}]
    dropped: Counter = field(default_factory=Counter)

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_annotations(self) -> int:
        return int(self.boxes.shape[0])

    def file_name(self, row: int) -> str:
        return self.name_blob[self.name_offsets[row] : self.name_offsets[row + 1]].decode("utf-8")

    def nbytes(self) -> int:
        arrays = (self.image_ids, self.widths, self.heights, self.name_offsets, self.ann_start,
                  self.boxes, self.category_ids, self.iscrowd)
        return sum(a.nbytes for a in arrays) + len(self.name_blob)


class _Collector:
    """Reduces parsed records to flat arrays as the parser emits them."""

    def __init__(self) -> None:
        self.image_ids = array.array("q")
        self.widths = array.array("i")
        self.heights = array.array("i")
        self.name_parts: list[bytes] = []
        self.name_lengths = array.array("q")
        self.ann_image_ids = array.array("q")
        self.boxes = array.array("d")
        self.category_ids = array.array("i")
        self.iscrowd = array.array("B")
        self.categories: list[dict[str, Any]] = []
        self.dropped: Counter = Counter()

    def images(self, items: Iterable[dict]) -> None:
        for image in items:
            name = str(image["file_name"]).encode("utf-8")
            self.image_ids.append(int(image["id"]))
            self.widths.append(int(image.get("width") or 0))
            self.heights.append(int(image.get("height") or 0))
            self.name_parts.append(name)
            self.name_lengths.append(len(name))

    def annotations(self, items: Iterable[dict]) -> None:
        ann_image_ids, boxes, category_ids, iscrowd = (
            self.ann_image_ids, self.boxes, self.category_ids, self.iscrowd)
        for ann in items:
            bbox = ann.get("bbox")
            if not bbox or len(bbox) != 4:
                self.dropped["annotation_without_bbox"] += 1
                continue
            try:
                boxes.extend(bbox)
            except TypeError:
                self.dropped["annotation_bad_bbox"] += 1
                continue
            ann_image_ids.append(int(ann["image_id"]))
            category_ids.append(int(ann["category_id"]))
            iscrowd.append(1 if ann.get("iscrowd") else 0)

    def category_items(self, items: Iterable[dict]) -> None:
        for cat in items:
            self.categories.append({"id": int(cat["id"]), "name": str(cat.get("name", cat["id"]))})


def _parse(url: str, storage_options: dict[str, Any] | None, prefix: str, collector: _Collector) -> None:
    backend = ijson_backend()
    fs = filesystem(url, storage_options)
    with fs.open(split_url(url)[1], "rb", block_size=READ_CHUNK) as f:
        items = backend.items(f, f"{prefix}.item", use_float=True, buf_size=1 << 20)
        try:
            {"images": collector.images, "annotations": collector.annotations,
             "categories": collector.category_items}[prefix](items)
        except ijson.JSONError as exc:
            raise UserError(f"{redact_url(url)} is not a COCO-format JSON file ({' '.join(str(exc).split())[:160]}); "
                            "pass the annotation file with --annotations") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{redact_url(url)}: a COCO '{prefix}' entry lacks or mistypes a field ({exc!r})") from exc


def _parse_images_and_categories(url: str, storage_options: dict[str, Any] | None) -> _Collector:
    collector = _Collector()
    _parse(url, storage_options, "images", collector)
    _parse(url, storage_options, "categories", collector)
    return collector


def load_annotation_index(
    url: str, storage_options: dict[str, Any] | None = None, parallel: bool | None = None
) -> AnnotationIndex:
    """Build the index of `url` (local path or s3://).

    The C parser's tokenising is the cost, and one parser can only collect one JSON path,
    so `images` + `categories` are parsed in a helper process while this process parses
    `annotations` (the bulk) — wall time about one pass. `parallel=None` does that for
    files over 64 MB; small files are parsed here, sequentially.
    """
    start = time.perf_counter()
    fs = filesystem(url, storage_options)
    size = int(fs.size(split_url(url)[1]))
    if parallel is None:
        parallel = size > PARALLEL_MIN_BYTES
    collector = _Collector()
    if parallel:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            images = pool.submit(_parse_images_and_categories, url, storage_options)
            _parse(url, storage_options, "annotations", collector)
            other = images.result()
        collector.image_ids, collector.widths, collector.heights = other.image_ids, other.widths, other.heights
        collector.name_parts, collector.name_lengths = other.name_parts, other.name_lengths
        collector.categories = other.categories
        collector.dropped.update(other.dropped)
        del other
    else:
        for prefix in ("images", "annotations", "categories"):
            _parse(url, storage_options, prefix, collector)
    index = _finish(collector)
    log.info(
        "indexed %s: %d images, %d annotations, %d categories, %.1f MB in %.1f s",
        url, index.num_images, index.num_annotations, len(index.categories), size / 1e6,
        time.perf_counter() - start,
    )
    return index


def _finish(c: _Collector) -> AnnotationIndex:
    image_ids = np.frombuffer(c.image_ids, dtype=np.int64)
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    duplicates = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    dropped = Counter(c.dropped)
    if duplicates.size:
        keep = np.ones(order.shape[0], dtype=bool)
        keep[duplicates + 1] = False
        dropped["duplicate_image_id"] += int(duplicates.size)
        order, sorted_ids = order[keep], sorted_ids[keep]
    lengths = np.frombuffer(c.name_lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    blob = b"".join(c.name_parts)
    c.name_parts.clear()
    names = [blob[starts[i] : starts[i + 1]] for i in order]
    name_blob = b"".join(names)
    name_offsets = np.concatenate([[0], np.cumsum([len(n) for n in names], dtype=np.int64)]).astype(np.int64)
    del names, blob
    widths = np.frombuffer(c.widths, dtype=np.int32)[order].copy()
    heights = np.frombuffer(c.heights, dtype=np.int32)[order].copy()
    del c.image_ids, c.widths, c.heights, c.name_lengths

    ann_image_ids = np.frombuffer(c.ann_image_ids, dtype=np.int64)
    ann_order = np.argsort(ann_image_ids, kind="stable")
    ann_sorted = ann_image_ids[ann_order]
    del c.ann_image_ids, ann_image_ids
    rows = np.searchsorted(sorted_ids, ann_sorted)
    known = (rows < sorted_ids.shape[0]) & (sorted_ids[np.minimum(rows, sorted_ids.shape[0] - 1)] == ann_sorted)
    if not known.all():
        dropped["annotation_unknown_image_id"] += int((~known).sum())
        ann_order, rows = ann_order[known], rows[known]
    del known, ann_sorted
    ann_start = np.searchsorted(rows, np.arange(sorted_ids.shape[0] + 1)).astype(np.int64)
    del rows
    category_ids = np.frombuffer(c.category_ids, dtype=np.int32)[ann_order]
    del c.category_ids
    iscrowd = np.frombuffer(c.iscrowd, dtype=np.uint8)[ann_order]
    del c.iscrowd
    boxes = np.frombuffer(c.boxes, dtype=np.float64).reshape(-1, 4)[ann_order]
    del c.boxes, ann_order
    return AnnotationIndex(
        image_ids=sorted_ids, widths=widths, heights=heights, name_blob=name_blob,
        name_offsets=name_offsets, ann_start=ann_start, boxes=boxes, category_ids=category_ids,
        iscrowd=iscrowd, categories=sorted(c.categories, key=lambda x: x["id"]), dropped=dropped,
    )



# -- cache: a resumed build need not re-parse a multi-GB file -------------------------------

_ARRAYS = ("image_ids", "widths", "heights", "name_offsets", "ann_start", "boxes", "category_ids", "iscrowd")


def source_fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Identity of the annotation file as storage reports it (size + mtime/ETag)."""
    info = filesystem(url, storage_options).info(split_url(url)[1])
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return json.dumps([redact_url(url), int(info.get("size") or 0), str(stamp)])


def save_index(index: AnnotationIndex, path: str, fingerprint: str) -> None:
    """Write the index as one uncompressed .npz, atomically."""
    meta = json.dumps({"fingerprint": fingerprint, "categories": index.categories, "dropped": dict(index.dropped)})
    arrays = {name: getattr(index, name) for name in _ARRAYS}
    arrays["name_blob"] = np.frombuffer(index.name_blob, dtype=np.uint8)
    arrays["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    atomic_write_with(path, lambda f: np.savez(f, **arrays))


def load_cached_index(path: str, fingerprint: str) -> AnnotationIndex | None:
    """The cached index at `path` if it was made from the same source file, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            if meta.get("fingerprint") != fingerprint:
                return None
            arrays = {name: data[name] for name in _ARRAYS}
            blob = data["name_blob"].tobytes()
    except (OSError, ValueError, KeyError):
        return None
    return AnnotationIndex(name_blob=blob, categories=meta["categories"], dropped=Counter(meta["dropped"]), **arrays)


def load_annotation_index_cached(
    url: str, storage_options: dict[str, Any] | None = None, cache: str | None = None
) -> AnnotationIndex:
    """`load_annotation_index`, reusing/writing the local cache file `cache` when given."""
    if cache is None:
        return load_annotation_index(url, storage_options)
    fingerprint = source_fingerprint(url, storage_options)
    index = load_cached_index(cache, fingerprint)
    if index is not None:
        log.info("annotation index from cache %s (%d images, %d annotations)", cache, index.num_images,
                 index.num_annotations)
        return index
    index = load_annotation_index(url, storage_options)
    save_index(index, cache, fingerprint)
    return index
