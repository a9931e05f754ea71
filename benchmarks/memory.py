"""Peak training-step memory of the Swin-L DINO, by activation-checkpointing combination.

    python benchmarks/memory.py --device cuda --json mem.json --write docs/memory.md
    python benchmarks/memory.py --device cpu --size 64x96 --images 1 --precisions fp32
    python benchmarks/memory.py --device cpu --count-only --precisions fp32   # full size, no time

For the 4-scale and 5-scale Swin-L DINO (configs/pretrain_o365_swinl*.yaml), each number of
images per step, each precision and each checkpointing combination (none, backbone, encoder,
decoder, and their unions), one forward + loss + backward on a synthetic batch (20 boxes per
image, denoising on) is measured in one run:

- activations: on CUDA, torch.cuda.max_memory_allocated() during the step above what was
  allocated before it, with parameters and gradient buffers already in place (so: saved
  activations, recomputation, temporaries and workspace); on the CPU, where allocators
  differ, the bytes autograd saves for backward (each storage counted once, what a
  checkpointed layer keeps included, its recomputation in backward not; parameters and
  buffers left out); --count-only drops each saved tensor as it counts it and runs no
  backward, so a full-size step counts in a RAM smaller than its activations;
- model states, counted as DeepSpeed does for one GPU without partitioning: fp32 training
  16 bytes/parameter (weights, gradients, Adam moments); bf16 mixed precision 20 bytes
  (2-byte weights and gradients, fp32 master weights, gradients and moments). ZeRO-2 over N
  GPUs divides the 16 bytes of optimizer-side state by N (docs/zero_memory.md);
- step seconds (median of --repeats after a warm-up) and their ratio to no checkpointing of
  the same model, images and precision.

The optimizer step is left out: it costs the same whatever is checkpointed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dino_scale.config import load_config  # noqa: E402
from dino_scale.engine.batching import outputs_to_float  # noqa: E402
from dino_scale.hardware import cpu_features_line  # noqa: E402
from dino_scale.io import atomic_write_text  # noqa: E402
from dino_scale.models import build_criterion, build_dino  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_acceptance import synthetic_batch  # noqa: E402

MODELS = {
    "4scale": REPO / "configs" / "pretrain_o365_swinl.yaml",
    "5scale": REPO / "configs" / "pretrain_o365_swinl_5scale.yaml",
}
# parts checkpointed: backbone (Swin blocks), encoder layers, decoder layers
COMBINATIONS = {
    "none": (False, False, False),
    "backbone": (True, False, False),
    "encoder": (False, True, False),
    "decoder": (False, False, True),
    "backbone+encoder": (True, True, False),
    "backbone+encoder+decoder": (True, True, True),
}
STATE_BYTES_PER_PARAM = {"fp32": 16, "bf16": 20}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="800x1333", help="image HxW")
    p.add_argument("--images", default="1,2", help="images per step, comma-separated")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--models", default="4scale,5scale")
    p.add_argument("--combinations", default=",".join(COMBINATIONS))
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--count-only", action="store_true",
                   help="CPU: one forward + loss per row that drops what autograd saves as it counts it (no "
                        "backward, no time), so that full-size rows fit in a small RAM")
    p.add_argument("--budget-gb", type=float, default=24.0,
                   help="the memory goal: a step (model states + activations) under this many GB (1e9 bytes)")
    p.add_argument("--max-slowdown", type=float, default=1.25,
                   help="the time goal: a step at most this many times the one without checkpointing")
    p.add_argument("--json", default=None, help="write every measurement to this file (rewritten after each)")
    p.add_argument("--write", default=None, help="write the markdown table to this file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied last")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)

    def names(value: str, allowed, flag: str) -> list[str]:
        chosen = [v for v in value.split(",") if v]
        bad = [v for v in chosen if v not in allowed]
        if bad or not chosen:
            parser.error(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
        return chosen

    args.models = names(args.models, MODELS, "--models")
    args.precisions = names(args.precisions, DTYPES, "--precisions")
    args.combinations = names(args.combinations, COMBINATIONS, "--combinations")
    try:
        args.images = [int(v) for v in args.images.split(",")]
        args.hw = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.hw) == 2 and min(args.hw) >= 32 and min(args.images) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--size must be HxW (>= 32) and --images positive integers, got {args.size!r}, {args.images!r}")
    if args.count_only and args.device != "cpu":
        parser.error("--count-only counts on the CPU; on CUDA the allocator measures the real step")
    return args


class SavedBytes:
    """Counts the bytes autograd saves for backward while active: each storage once, the
    model's parameters and buffers left out (they are model states, counted apart).

    With `keep=False` what autograd saves is dropped at once (no backward is possible): the
    forward then holds only its working set, so a full-size count fits in a small RAM. A
    storage freed and another allocated at its address are told apart by a weak reference."""

    def __init__(self, model: torch.nn.Module, keep: bool = True) -> None:
        self.keep = keep
        self.model_states = {_storage_ref(t).cdata for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, StorageWeakRef] = {}
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | None:
        ref = _storage_ref(tensor)
        if ref.cdata not in self.model_states:
            known = self.seen.get(ref.cdata)
            if known is None or known.expired():
                self.seen[ref.cdata] = ref
                self.total += tensor.untyped_storage().nbytes()
        return tensor if self.keep else None


def _storage_ref(tensor: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(tensor.untyped_storage())


def set_checkpointing(model: torch.nn.Module, combination: str) -> None:
    backbone, encoder, decoder = COMBINATIONS[combination]
    model.backbone.grad_checkpointing = backbone
    model.transformer.checkpoint_encoder_layers = encoder
    model.transformer.decoder.checkpoint_layers = decoder


def one_step(model, criterion, batch, device, dtype, counter: SavedBytes | None = None) -> None:
    """Forward + loss (counted by `counter` when given) + backward, unless `counter` drops what
    autograd saves: then there is nothing to run backward on."""
    batch = batch.to(device, dtype=dtype)
    images, masks, targets = batch.images, batch.masks, batch.targets
    with contextlib.ExitStack() as stack:
        if counter is not None:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t))
        outputs = model(images, masks, targets)
        loss = criterion(outputs_to_float(outputs), targets)["loss"]
    if counter is None or counter.keep:
        loss.backward()


def measure(model, criterion, batch, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    one_step(model, criterion, batch, device, dtype)  # warm-up: gradient buffers now exist
    model.zero_grad(set_to_none=False)
    seconds, activation_bytes = [], 0
    for i in range(repeats):
        counter = None if cuda or i > 0 else SavedBytes(model)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        one_step(model, criterion, batch, device, dtype, counter)
        sync()
        seconds.append(time.perf_counter() - start)
        if cuda:
            activation_bytes = max(activation_bytes, torch.cuda.max_memory_allocated() - before)
        elif counter is not None:
            activation_bytes = counter.total
        model.zero_grad(set_to_none=False)
    return {"seconds": statistics.median(seconds), "activation_bytes": activation_bytes}


def count_only(model, criterion, batch, device: torch.device, dtype: torch.dtype) -> dict[str, float | None]:
    """The bytes a training step's forward + loss saves for backward, from one forward that
    keeps none of them (no backward, no time)."""
    counter = SavedBytes(model, keep=False)
    one_step(model, criterion, batch, device, dtype, counter)
    return {"seconds": None, "activation_bytes": counter.total}


def run(args: argparse.Namespace, on_row: Callable[[list[dict[str, Any]]], None] | None = None
        ) -> list[dict[str, Any]]:
    """Every measurement of `args`, in order; `on_row(rows)` after each (to keep partial runs)."""
    device = torch.device(args.device)
    height, width = args.hw
    rows: list[dict[str, Any]] = []
    for name in args.models:
        cfg = load_config(MODELS[name], ["model.backbone.grad_checkpointing=false", *args.overrides])
        for precision in args.precisions:
            dtype = DTYPES[precision]
            torch.manual_seed(0)
            model = build_dino(cfg.model).to(device=device, dtype=dtype).train()
            criterion = build_criterion(cfg.model)
            if hasattr(criterion, "to"):
                criterion.to(device)
            params = sum(p.numel() for p in model.parameters())
            states = params * STATE_BYTES_PER_PARAM[precision]
            for images in args.images:
                batch = synthetic_batch(images, height, width, cfg.model.num_classes, boxes_per_image=20)
                baseline = None
                for combination in args.combinations:
                    set_checkpointing(model, combination)
                    row = {"model": name, "precision": precision, "images": images, "checkpointing": combination,
                           "parameters": params, "model_state_gib": states / GIB}
                    try:
                        if args.count_only:
                            m = count_only(model, criterion, batch, device, dtype)
                        else:
                            m = measure(model, criterion, batch, device, dtype, args.repeats)
                    except torch.OutOfMemoryError:  # a row that does not fit this GPU is a finding too
                        model.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        row.update(out_of_memory=True, activation_gib=None, total_gib=None, seconds=None,
                                   time_ratio=None)
                    else:
                        if combination == "none":
                            baseline = m["seconds"]
                        row.update(out_of_memory=False, activation_gib=m["activation_bytes"] / GIB,
                                   total_gib=(states + m["activation_bytes"]) / GIB, seconds=m["seconds"],
                                   time_ratio=m["seconds"] / baseline if baseline and m["seconds"] else None)
                    rows.append(row)
                    print(f"{name} {precision} {images} img {combination:>25}: " + describe(row), flush=True)
                    if on_row:
                        on_row(rows)
            del model, criterion
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def describe(row: dict[str, Any]) -> str:
    if row.get("out_of_memory"):  # records before 2026-11-30 have no such key
        return "out of memory"
    return (f"activations {row['activation_gib']:6.2f} GiB, total {row['total_gib']:6.2f} GiB"
            + (f", {row['seconds']:.3f} s" if row["seconds"] else "")
            + (f" ({row['time_ratio']:.2f}x)" if row["time_ratio"] else ""))


def goal_picks(rows: list[dict[str, Any]], budget_gb: float, max_slowdown: float) -> list[str]:
    """Per model, precision and images: the fastest combination whose step fits `budget_gb`
    within `max_slowdown` of no checkpointing (the issue's goal: 24 GB, +25%). Without step
    times (a CPU count) only the memory half of the goal is judged."""
    lines = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["precision"], r["images"]), []).append(r)
    for (model, precision, images), group in groups.items():
        head = f"{model} {precision} {images} img"
        fits = [r for r in group if r.get("total_gib") is not None and r["total_gib"] * GIB < budget_gb * 1e9]
        if not fits:
            lines.append(f"{head}: nothing fits {budget_gb:g} GB")
            continue
        if all(r["time_ratio"] is not None for r in fits):
            fits = sorted((r for r in fits if r["time_ratio"] <= max_slowdown), key=lambda r: r["seconds"])
            head += f", under {budget_gb:g} GB within {max_slowdown:g}x of none"
        else:  # no ratio (a CPU count, or `none` ran out of memory): the least recomputation that fits
            fits.sort(key=lambda r: list(COMBINATIONS).index(r["checkpointing"]))
            head += f", under {budget_gb:g} GB (no time ratio to none: memory only)"
        if not fits:
            lines.append(f"{head}: no combination")
            continue
        others = ", ".join(r["checkpointing"] for r in fits[1:])
        lines.append(f"{head}: {fits[0]['checkpointing']} ({describe(fits[0]).strip()})"
                     + (f"; also {others}" if others else ""))
    return lines


def markdown(rows: list[dict[str, Any]], goal: list[str], args: argparse.Namespace, machine: str) -> str:
    if args.device == "cuda":
        what = "torch.cuda.max_memory_allocated during the step"
    elif args.count_only:
        what = "bytes autograd saves in forward + loss, counted without keeping them"
    else:
        what = "bytes autograd saves in forward + loss"
    command = f"python benchmarks/memory.py --device {args.device}" + (" --count-only" if args.count_only else "")
    timing = ("No time: a count-only forward runs no backward." if args.count_only else
              "Time: forward + loss + backward, ratio to no checkpointing of the same row group.")
    lines = [
        f"# Swin-L DINO training-step memory by activation checkpointing ({args.size}, {machine})",
        "",
        f"Measured by `{command}` (activations: {what};",
        "parameters and buffers left out; model states: DeepSpeed's accounting for one GPU without",
        "partitioning, fp32 16 B/param, bf16 mixed precision 20 B/param).",
        f"{timing} Synthetic batch, 20 boxes per image, denoising on.",
        "",
        "| model | precision | images | checkpointed | activations (GiB) | + model states (GiB) | step (s) | vs none |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["out_of_memory"]:
            lines.append(f"| {r['model']} | {r['precision']} | {r['images']} | {r['checkpointing']} | "
                         "out of memory | | | |")
            continue
        seconds = f"{r['seconds']:.3f}" if r["seconds"] else ""
        ratio = f"{r['time_ratio']:.2f}x" if r["time_ratio"] else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['images']} | {r['checkpointing']} | "
                     f"{r['activation_gib']:.2f} | {r['total_gib']:.2f} | {seconds} | {ratio} |")
    lines += ["", f"The goal (a step under {args.budget_gb:g} GB at most {args.max_slowdown:g}x the step without "
              "checkpointing), the fastest combination that meets it:", ""]
    lines += [f"- {line}" for line in goal]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"CPU, {torch.get_num_threads()} threads, {cpu_features_line()}")
    print(f"torch {torch.__version__}, {machine}, images {args.size}", flush=True)
    def save(rows: list[dict[str, Any]]) -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps({"machine": machine, "torch": torch.__version__,
                                                     "size": args.size, "count_only": args.count_only,
                                                     "rows": rows,
                                                     "goal": goal_picks(rows, args.budget_gb, args.max_slowdown)},
                                                    indent=2))

    rows = run(args, on_row=save)
    goal = goal_picks(rows, args.budget_gb, args.max_slowdown)
    for line in goal:
        print("goal:", line)
    if args.write:
        atomic_write_text(args.write, markdown(rows, goal, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
