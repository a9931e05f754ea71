"""`python -m data_pipeline.build_shards`: COCO-format annotations + images (local or s3://)
-> WebDataset shards + manifest (local or s3://), one Ray task per shard.

The driver streams the annotation file into an index, plans shards deterministically from
`--seed`, and keeps at most `--max-in-flight` shard tasks running (plain Ray tasks bounded
with `ray.wait`: worker crashes are retried with `max_retries`, transient storage errors
(OSError) with `retry_exceptions`). Each shard becomes visible only when complete and is
followed by a small sidecar (`<shard>.done.json`: plan digest, bytes, sha256); a re-run
verifies shards against their sidecars and skips those that match. The manifest is
written last, only when every shard succeeded.

Credentials come from the environment / AWS config (or `--storage-option key=...`); they
are never logged or written to the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import yaml

from data_pipeline.annotation_index import load_annotation_index_cached
from data_pipeline.plan import ShardTask, plan_shards
from data_pipeline.writer import SAMPLE_FORMAT_VERSION, WriterSettings, write_shard
from dino_scale.data.manifest import build_manifest, write_manifest
from dino_scale.data.storage import Storage, redact_url
from dino_scale.errors import DEBUG_FLAG, UserError, exit_process, run_command
from dino_scale.log import get_logger, progress, setup_logging
from dino_scale.preflight import Report, require
from dino_scale.preflight.locations import Locations

log = get_logger("data_pipeline.build_shards")

REPORT_NAME = "build_report.json"
TRANSIENT_ERRORS: list[type[BaseException]] = [OSError, TimeoutError]
try:  # s3fs's client: "could not connect" / "connection closed" are not OSErrors there
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    TRANSIENT_ERRORS += [BotoConnectionError, HTTPClientError]
except ImportError:  # no S3 support installed
    pass
CANCEL_WAIT_S = 30.0


class BuildError(RuntimeError):
    """Some shards failed after their retries; finished shards stay and a re-run resumes."""


@dataclass
class BuildSettings:
    annotations: str
    images: str
    output: str
    samples_per_shard: int = 1000
    seed: int = 0
    prefix: str = "shard"
    max_side: int | None = None
    jpeg_quality: int = 90
    limit: int | None = None
    verify: str = "sha256"
    max_in_flight: int | None = None
    max_retries: int = 3
    storage_options: dict[str, Any] = field(default_factory=dict)
    index_cache: str | None = None  # local .npz reused by re-runs (resume without re-parsing)

    def public(self) -> dict[str, Any]:
        """The settings recorded in the manifest (no storage options: they may hold secrets)."""
        return {
            "annotations": redact_url(self.annotations), "images": redact_url(self.images),
            "samples_per_shard": self.samples_per_shard, "seed": self.seed, "prefix": self.prefix,
            "max_side": self.max_side, "jpeg_quality": self.jpeg_quality, "limit": self.limit,
            "format_version": SAMPLE_FORMAT_VERSION,
        }


def build_shards(
    settings: BuildSettings, on_shard_done: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the build on the Ray cluster this process is connected to; returns the report.

    `on_shard_done(record)` is called on the driver after each shard finishes (progress
    hooks; an exception raised there interrupts the build like Ctrl-C would).
    """
    start = time.perf_counter()
    index = load_annotation_index_cached(settings.annotations, settings.storage_options, settings.index_cache)
    fingerprint = {**settings.public(), "categories": [c["id"] for c in index.categories]}
    for key in ("annotations", "images", "limit"):
        fingerprint.pop(key)
    tasks = plan_shards(index, settings.samples_per_shard, settings.seed, settings.prefix, fingerprint, settings.limit)
    writer = WriterSettings(
        images_root=settings.images, output_root=settings.output,
        known_category_ids=[c["id"] for c in index.categories],
        input_storage_options=settings.storage_options, output_storage_options=settings.storage_options,
        max_side=settings.max_side, jpeg_quality=settings.jpeg_quality, verify=settings.verify,
    )
    out = Storage(settings.output, settings.storage_options)
    out.makedirs()
    max_in_flight = settings.max_in_flight or max(1, int(2 * ray.cluster_resources().get("CPU", 1)))
    log.info("%d images -> %d shards of <= %d samples; %d tasks in flight at most",
             sum(t.num_images for t in tasks), len(tasks), settings.samples_per_shard, max_in_flight)
    remote = ray.remote(write_shard).options(
        num_cpus=1, max_retries=settings.max_retries, retry_exceptions=TRANSIENT_ERRORS
    )
    records: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    categories, index_dropped = index.categories, dict(index.dropped)
    del index  # the tasks carry their own rows; free the driver's arrays while they run
    runs = _run_bounded(remote, tasks, writer, max_in_flight)
    try:
        for record, error, task in progress(runs, total=len(tasks), desc="shards", unit="shard"):
            if error is not None:
                failures[task.name] = error
                log.error("shard %s failed after %d retries: %s", task.name, settings.max_retries, error)
                continue
            records.append(record)
            if on_shard_done is not None:
                on_shard_done(record)
    finally:
        runs.close()  # on interruption: cancel the tasks still in flight
    report = _report(records, failures, index_dropped, time.perf_counter() - start)
    try:
        out.write_bytes(REPORT_NAME, json.dumps(report, indent=1).encode())
        if not failures:
            write_manifest(out, build_manifest(records, categories, settings.public(), index_dropped))
    except tuple(TRANSIENT_ERRORS) as exc:  # the store itself is unreachable (outage) or full
        raise BuildError(
            f"could not write {REPORT_NAME} / the manifest to {redact_url(settings.output)} "
            f"({type(exc).__name__}: {exc}); {len(records)} of {len(tasks)} shards are finished and kept, "
            "re-run the same command to resume."
        ) from exc
    if failures:
        raise BuildError(
            f"{len(failures)} of {len(tasks)} shards failed ({', '.join(sorted(failures)[:5])}...); "
            "finished shards are kept, re-run the same command to resume. No manifest written."
        )
    report["manifest"] = out.url("manifest.json")
    _log_report(report)
    return report


def _run_bounded(remote: Any, tasks: list[ShardTask], writer: WriterSettings, max_in_flight: int) -> Iterator[tuple]:
    """Yield (record, error, task) as shard tasks finish, keeping <= max_in_flight running."""
    queue = iter(tasks)
    pending: dict[Any, ShardTask] = {}
    writer_ref = ray.put(writer)

    def submit() -> None:
        task = next(queue, None)
        if task is not None:
            pending[remote.remote(task, writer_ref)] = task

    try:
        for _ in range(max_in_flight):
            submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    record, error = ray.get(ref), None
                except Exception as exc:  # noqa: BLE001 - reported per shard, build goes on
                    record, error = None, f"{type(exc).__name__}: {exc}"
                submit()
                yield record, error, task
    finally:
        if pending:  # interrupted: stop what is still running (its shards are atomic either way)
            for ref in pending:
                ray.cancel(ref, force=False)
            # let them settle, so that nothing of this build still writes once it returns
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)


def _report(
    records: list[dict[str, Any]], failures: dict[str, str], index_dropped: dict[str, int], seconds: float
) -> dict[str, Any]:
    dropped: Counter = Counter(index_dropped)
    notes: Counter = Counter()
    written = [r for r in records if r["status"] == "written"]
    for r in written + [r for r in records if r["status"] == "skipped"]:
        dropped.update(r.get("dropped", {}))
        notes.update(r.get("notes", {}))
    samples_written = sum(r["samples"] for r in written)
    return {
        "shards_written": len(written),
        "shards_skipped": len(records) - len(written),
        "shards_failed": len(failures),
        "failures": failures,
        "samples": sum(r["samples"] for r in records),
        "samples_written": samples_written,
        "boxes": sum(r["boxes"] for r in records),
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "notes": {k: v for k, v in sorted(notes.items()) if v},
        "seconds": round(seconds, 3),
        "images_per_second_written": round(samples_written / seconds, 2) if seconds > 0 else None,
    }


def _log_report(report: dict[str, Any]) -> None:
    log.info(
        "shards: %d written, %d skipped (already complete and verified), %d failed; %d samples, %d boxes",
        report["shards_written"], report["shards_skipped"], report["shards_failed"],
        report["samples"], report["boxes"],
    )
    for reason, count in report["dropped"].items():
        log.info("dropped %-28s %d", reason, count)
    for reason, count in report["notes"].items():
        log.info("note    %-28s %d", reason, count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.build_shards",
        description="Build WebDataset shards + manifest from a COCO-format dataset with Ray.",
    )
    p.add_argument("--annotations", required=True, help="COCO-format JSON (path or s3://)")
    p.add_argument("--images", required=True, help="image root (directory or s3:// prefix)")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="fixes which image goes to which shard")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this (orig_size is kept)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the plan")
    p.add_argument("--index-cache", default=None, metavar="PATH.npz",
                   help="local file caching the parsed annotation index for re-runs (checked against "
                        "the annotation file's size and mtime/ETag)")
    p.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                   help="how shards left by an earlier run are checked before being skipped")
    p.add_argument("--ray-address", default=None,
                   help="'auto' or host:port joins a cluster; default starts a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store of the local Ray")
    p.add_argument("--max-in-flight", type=int, default=None, help="default: 2 x cluster CPUs")
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL / AWS config)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec/s3fs option (value parsed as YAML); repeatable; never logged")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(DEBUG_FLAG, action="store_true", help="tracebacks instead of one-line errors (or DINO_DEBUG=1)")
    return p


def storage_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.storage_option:
        if "=" not in item:
            raise UserError("--storage-option expects KEY=VALUE (got an argument without '=')")
        key, value = item.split("=", 1)
        options[key] = yaml.safe_load(value)
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


def check_inputs(settings: BuildSettings) -> None:
    """Before Ray starts: the annotation file and the image root can be read (S3: one cheap
    call proves credentials and endpoint)."""
    report = Report()
    where = Locations(report, settings.storage_options)
    if where.readable(settings.annotations, "file", "--annotations", "annotation file"):
        with Storage(settings.annotations.rpartition("/")[0] or ".", settings.storage_options).open(
                settings.annotations.rpartition("/")[2]) as f:
            head = f.read(256).lstrip()
        if not head.startswith(b"{"):
            report.fail("--annotations", f"{redact_url(settings.annotations)} is not a JSON object "
                                         "(COCO format: {\"images\": [...], \"annotations\": [...], ...})")
    where.readable(settings.images, "dir", "--images", "image root")
    require(report)


def init_ray(address: str | None, num_cpus: int | None, object_store_mb: int) -> bool:
    """Connect to (address) or start a local Ray; False when this process already had one."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=max(object_store_mb, 80) << 20)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging(level=getattr(__import__("logging"), args.log_level.upper()))
    settings = BuildSettings(
        annotations=args.annotations, images=args.images, output=args.output,
        samples_per_shard=args.samples_per_shard, seed=args.seed, prefix=args.prefix,
        max_side=args.max_side, jpeg_quality=args.jpeg_quality, limit=args.limit, verify=args.verify,
        max_in_flight=args.max_in_flight, max_retries=args.max_retries,
        storage_options=storage_options_from_args(args), index_cache=args.index_cache,
    )
    check_inputs(settings)
    owns_ray = init_ray(args.ray_address, args.num_cpus, args.object_store_mb)
    try:
        return build_shards(settings)
    finally:
        if owns_ray:
            ray.shutdown()


def _main(argv: list[str] | None) -> int:
    try:
        main(argv)
    except BuildError as exc:  # finished shards are kept: not a user error, a re-run resumes
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(run_command(_main, "python -m data_pipeline.build_shards"))
