"""The suite's figures: each case adds one entry to a JSON file (`$DINO_FAULTS_SUMMARY`,
default `<tmp>/dino-faults-summary.json`) that the README section quotes."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dino_scale.io import atomic_write_text


def summary_path() -> Path:
    return Path(os.environ.get("DINO_FAULTS_SUMMARY") or Path(tempfile.gettempdir()) / "dino-faults-summary.json")


def record(case: str, *, faults_injected: int, samples_checked: int, data_lost: int, **details: Any) -> None:
    path = summary_path()
    # pytest-xdist workers record concurrently: hold a lock across read-modify-write
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _add_case(path, case, {"faults_injected": faults_injected, "samples_checked": samples_checked,
                               "data_lost": data_lost, **details})


def _add_case(path: Path, case: str, figures: dict[str, Any]) -> None:
    try:
        cases = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        cases = {}
    cases.pop("_totals", None)
    cases[case] = figures
    totals = {k: sum(c[k] for c in cases.values()) for k in ("faults_injected", "samples_checked", "data_lost")}
    atomic_write_text(path, json.dumps({**dict(sorted(cases.items())), "_totals": {"cases": len(cases), **totals}},
                                       indent=1))
