"""Image names in an annotation file cannot make the shard writer read outside the image root."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.plan import ShardTask
from data_pipeline.writer import WriterSettings, write_shard
from dino_scale.data.storage import is_safe_relative_name


@pytest.mark.parametrize("name, safe", [
    ("000001.jpg", True), ("images/v1/patch8/o365_1.jpg", True), ("a..b.jpg", True),
    ("", False), ("/etc/passwd", False), ("../secret.jpg", False), ("images/../../x.jpg", False),
    ("..\\x.jpg", False), ("~/x.jpg", False), ("s3://other-bucket/x.jpg", False),
])
def test_safe_relative_names(name, safe):
    assert is_safe_relative_name(name) is safe


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_writer_drops_names_that_leave_the_image_root(tmp_path):
    root, out = tmp_path / "images", tmp_path / "shards"
    root.mkdir()
    (root / "ok.jpg").write_bytes(_jpeg("red"))
    (tmp_path / "outside.jpg").write_bytes(_jpeg("blue"))  # reachable as ../outside.jpg
    names = ["ok.jpg", "../outside.jpg", str(tmp_path / "outside.jpg")]
    n = len(names)
    task = ShardTask(
        index=0, name="train-000000.tar", digest="d", image_ids=np.arange(1, n + 1, dtype=np.int64),
        file_names=names, widths=np.full(n, 32, np.int32), heights=np.full(n, 24, np.int32),
        ann_start=np.arange(n + 1, dtype=np.int64),
        boxes=np.tile(np.array([[1.0, 1.0, 10.0, 10.0]]), (n, 1)),
        category_ids=np.ones(n, np.int32), iscrowd=np.zeros(n, np.uint8),
    )
    record = write_shard(task, WriterSettings(str(root), str(out), known_category_ids=[1]))
    assert record["samples"] == 1
    assert {k: v for k, v in record["dropped"].items() if v} == {"unsafe_file_name": 2}
    with tarfile.open(out / "train-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["1.jpg", "1.json"]
