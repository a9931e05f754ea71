import os
from pathlib import Path

import pytest

from dino_scale.engine.distributed import PICKED_PORTS, PORT_RANGE_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_MINI = SHARED / "data" / "coco-mini"

os.environ.setdefault("DINO_NO_PROGRESS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# pytest-xdist workers (`make test` runs two) draw ports from ranges of their own, and so do
# the processes they start: a master port one picked cannot be taken by the other meanwhile.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
if _WORKER.startswith("gw") and PORT_RANGE_ENV not in os.environ:
    _index, _count = int(_WORKER[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _span = (PICKED_PORTS[1] - PICKED_PORTS[0]) // _count
    _low = PICKED_PORTS[0] + _index * _span
    os.environ[PORT_RANGE_ENV] = f"{_low}-{_low + _span}"


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
