"""A training rank with faults injected: the fault suite launches this script under the
DeepSpeed launcher in place of `launch/pretrain_o365.py`, with the same arguments.

The faults are monkeypatches installed in the rank process before training starts, so
the library carries no test hooks. `DINO_FAULTS` (JSON) selects them; every key is optional:

- `"record_dir"`: write `rank<r>.pid` at start, `rank<r>.criterion.jsonl` as training goes
  (one line appended per criterion call: loss finite?, injected?, image ids, digests of the
  parameters and of the torch RNG state, all parameters finite?) and, when the trainer shuts
  its metrics down, `rank<r>.metrics.prom` (the rank's Prometheus registry, text format).
- `"enospc_in_save": {"step": N, "rank": r}`: DeepSpeed's `torch.save` of checkpoint
  `step_N` on rank r writes half of the file, then fails with ENOSPC (disk full).
- `"kill_in_save": {"step": N, "rank": r}`: rank r SIGKILLs itself while saving `step_N`,
  after DeepSpeed wrote its files and before the per-rank state and the COMPLETE marker.
- `"nan": {"rank": r, "calls": [i, ...], "from": k}`: the criterion's loss on rank r is NaN
  at these 0-based calls of this process, and at every call >= k.
- `"hold": {"rank": r, "call": i, "release": FILE, "flag": FILE}`: rank r creates `flag` at
  call i and waits inside the criterion until `release` exists (max 120 s): a fixed point
  at which the test kills or preempts the job.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

FAULTS = json.loads(os.environ.get("DINO_FAULTS", "{}"))
RANK = int(os.environ.get("RANK", "0"))


def _mine(spec: dict | None) -> bool:
    return spec is not None and int(spec.get("rank", 0)) == RANK


def _record_dir() -> Path | None:
    return Path(FAULTS["record_dir"]) if "record_dir" in FAULTS else None


def _install_save_faults() -> None:
    enospc, kill = FAULTS.get("enospc_in_save"), FAULTS.get("kill_in_save")
    if _mine(enospc):
        marker = f"/step_{int(enospc['step'])}/"
        original_save = torch.save

        def failing_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and marker in str(f):
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return original_save(obj, f, *args, **kwargs)

        torch.save = failing_save
    if _mine(kill):
        from dino_scale.engine import checkpoint

        marker = f"/step_{int(kill['step'])}/"
        original_write = checkpoint.atomic_write_with

        def dying_write(path, write):
            if marker in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_write(path, write)

        checkpoint.atomic_write_with = dying_write


def _digest(model: torch.nn.Module) -> tuple[str, bool]:
    h = hashlib.sha256()
    finite = True
    for name, p in sorted(model.named_parameters()):
        data = p.detach().float().cpu().contiguous()
        finite &= bool(torch.isfinite(data).all())
        h.update(name.encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest(), finite


def _install_criterion_faults() -> None:
    import dino_scale.models as models

    nan, hold = FAULTS.get("nan"), FAULTS.get("hold")
    nan_calls = set(nan.get("calls", [])) if _mine(nan) else set()
    nan_from = nan.get("from") if _mine(nan) else None
    captured: dict[str, torch.nn.Module] = {}
    build_dino, build_criterion = models.build_dino, models.build_criterion

    def capturing_build_dino(cfg):
        captured["model"] = build_dino(cfg)
        return captured["model"]

    def faulty_build_criterion(cfg):
        inner = build_criterion(cfg)

        class FaultyCriterion(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner, self.calls = inner, 0

            def forward(self, outputs, targets, num_boxes=None):
                call, self.calls = self.calls, self.calls + 1
                if _mine(hold) and call == int(hold["call"]):
                    Path(hold["flag"]).touch()
                    deadline = time.monotonic() + 120
                    while not Path(hold["release"]).exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                losses = self.inner(outputs, targets, num_boxes=num_boxes)
                injected = call in nan_calls or (nan_from is not None and call >= nan_from)
                if injected:
                    losses = {**losses, "loss": losses["loss"] * float("nan")}
                if "model" in captured and _record_dir() is not None:
                    digest, finite = _digest(captured["model"])
                    _record({"call": call, "injected": injected, "params_sha256": digest,
                                     "image_ids": [int(t["image_id"]) for t in targets],
                                     "rng_sha256": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
                                    "params_finite": finite,
                                    "loss_finite": bool(torch.isfinite(losses["loss"]).item())})
                return losses

        return FaultyCriterion()

    models.build_dino, models.build_criterion = capturing_build_dino, faulty_build_criterion


def _record(entry: dict) -> None:
    """Append one criterion call's record at once: a rank killed later keeps what it did."""
    with open(_record_dir() / f"rank{RANK}.criterion.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def _install_recording() -> None:
    directory = _record_dir()
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank{RANK}.pid").write_text(str(os.getpid()))
    from prometheus_client import generate_latest

    from dino_scale.metrics import TrainingMetrics

    shutdown = TrainingMetrics.shutdown

    def recording_shutdown(self):
        if self._server is not None:
            (directory / f"rank{RANK}.metrics.prom").write_bytes(generate_latest(self.registry))
            (directory / f"rank{RANK}.metrics_bind.json").write_text(
                json.dumps(list(self._server.server_address)[:2]))
        return shutdown(self)

    TrainingMetrics.shutdown = recording_shutdown


def main() -> int:
    _install_recording()
    _install_save_faults()
    _install_criterion_faults()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))  # cli.py, as launch/*.py import it
    import cli

    parser = cli.training_parser("tests/faults/train_rank.py", "training rank with faults", finetune=False)
    return cli.run_training(cli.parse(parser, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
