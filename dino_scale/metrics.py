"""Prometheus metrics of a training process, one HTTP endpoint per rank.

Each rank serves its own registry on `metrics.base_port + local_rank` (port 0: any free
port) and writes the port it got to `<output_dir>/metrics/rank<r>.port`, so a scraper (or a
test) can find it. Labels are bounded: `term` takes the loss-term names of the criterion
(a fixed set per model), `group` the three parameter groups.

Names follow Prometheus conventions: base units (seconds, bytes), counters end in `_total`.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dino_scale.config import MetricsConfig
from dino_scale.io import atomic_write_text
from dino_scale.log import get_logger

log = get_logger(__name__)


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best available
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingMetrics:
    """The trainer's metrics; `serve()` starts the endpoint (no-op when disabled)."""

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.local_rank = local_rank
        self.port: int | None = None
        self._server = None
        r = self.registry = CollectorRegistry(auto_describe=True)
        buckets = tuple(cfg.step_seconds_buckets)
        self.loss = Gauge("dino_loss", "Last training loss term (unweighted; 'loss' is the weighted total)",
                          ["term"], registry=r)
        self.learning_rate = Gauge("dino_learning_rate", "Learning rate per parameter group",
                                   ["group"], registry=r)
        self.grad_norm = Gauge("dino_grad_norm", "Global gradient norm before clipping", registry=r)
        self.images_per_second = Gauge("dino_images_per_second",
                                       "Training throughput of this rank over the last step", registry=r)
        self.step_seconds = Histogram("dino_step_seconds", "Wall time of one optimizer step (all its micro-batches)",
                                      buckets=buckets, registry=r)
        self.data_wait_seconds = Histogram("dino_data_wait_seconds",
                                           "Time spent waiting for the next batch", buckets=buckets,
                                           registry=r)
        self.steps = Counter("dino_steps", "Optimizer steps taken", registry=r)
        # counters restart with each process; these continue across restarts and world sizes
        self.run_step = Gauge("dino_run_step", "Optimizer steps of the whole run, from the checkpoint on", registry=r)
        self.run_images = Gauge("dino_run_images", "Images trained by all ranks over the whole run", registry=r)
        self.images = Counter("dino_images", "Training images consumed by this rank", registry=r)
        self.skipped_steps = Counter("dino_skipped_steps", "Steps skipped because the loss was not finite",
                                     registry=r)
        self.checkpoint_seconds = Histogram("dino_checkpoint_seconds", "Wall time of a checkpoint save",
                                            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                            registry=r)
        self.eval_ap = Gauge("dino_eval_ap", "COCO AP (0-1) of the last evaluation",
                             ["metric"], registry=r)
        self.epoch = Gauge("dino_epoch", "Current epoch", registry=r)
        self.data_samples_read = Gauge("dino_data_samples_read",
                                       "Samples this rank's loader read in the current epoch (good or bad)",
                                       registry=r)
        self.data_skipped_samples = Gauge("dino_data_skipped_samples",
                                          "Corrupt samples this rank's loader skipped in the current epoch",
                                          ["reason"], registry=r)
        self.rss_bytes = Gauge("dino_process_resident_memory_bytes", "Resident set size of this rank",
                               registry=r)
        self.cuda_allocated_bytes = Gauge("dino_cuda_memory_allocated_bytes",
                                          "CUDA memory allocated by tensors", registry=r)
        self.cuda_max_allocated_bytes = Gauge("dino_cuda_memory_max_allocated_bytes",
                                              "Peak CUDA memory allocated by tensors", registry=r)

    def serve(self, port_dir: str | Path | None = None) -> int | None:
        if not self.cfg.enabled:
            return None
        port = self.cfg.base_port + self.local_rank if self.cfg.base_port else 0
        self.observe_memory()  # never served as 0 before the first step
        try:
            server, _ = start_http_server(port, addr=self.cfg.bind_address, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"rank {self.rank}: cannot serve metrics on {self.cfg.bind_address}:{port} ({exc}); "
                "set metrics.base_port to a free range, 0 for any free port, or metrics.enabled=false"
            ) from exc
        self._server = server
        self.port = server.server_port
        if port_dir is not None:
            atomic_write_text(Path(port_dir) / f"rank{self.rank}.port", str(self.port))
        log.info("metrics on http://%s:%d/metrics", self.cfg.bind_address, self.port)
        return self.port

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_run(self, step: int, images: int) -> None:
        """The run's position (from the checkpoint after a resume, whatever the world size)."""
        self.run_step.set(step)
        self.run_images.set(images)

    def observe_step(self, *, losses: Mapping[str, float], lrs: Mapping[str, float],
                     grad_norm: float | None, images: int, step_seconds: float,
                     data_wait_seconds: float) -> None:
        for term, value in losses.items():
            self.loss.labels(term=term).set(value)
        for group, lr in lrs.items():
            self.learning_rate.labels(group=group).set(lr)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        self.images.inc(images)
        self.step_seconds.observe(step_seconds)
        self.data_wait_seconds.observe(data_wait_seconds)
        if step_seconds > 0:
            self.images_per_second.set(images / step_seconds)
        self.observe_memory()

    def observe_data(self, stats: Mapping[str, Any]) -> None:
        """The loader's `stats()`: samples read and skipped (by reason) this epoch."""
        self.data_samples_read.set(stats["samples_read"])
        self.data_skipped_samples.clear()  # a new epoch starts its counts again
        for reason, count in stats["reasons"].items():
            self.data_skipped_samples.labels(reason=reason).set(count)

    def observe_memory(self) -> None:
        self.rss_bytes.set(_rss_bytes())
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.cuda_allocated_bytes.set(torch.cuda.memory_allocated())
                self.cuda_max_allocated_bytes.set(torch.cuda.max_memory_allocated())
        except Exception:  # memory stats are best effort
            pass

    def observe_eval(self, stats: Mapping[str, float]) -> None:
        for metric, value in stats.items():
            self.eval_ap.labels(metric=metric).set(value)
