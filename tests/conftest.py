import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_MINI = SHARED / "data" / "coco-mini"

os.environ.setdefault("DINO_NO_PROGRESS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The shared 80-image real COCO subset; tests skip with a reason where it is absent."""
    ann = COCO_MINI / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI} (see shared/data/coco-mini/SOURCE.md)")
    return COCO_MINI
pytest_plugins = ["s3server"]  # tests/s3server.py: S3 server + fresh bucket fixtures
