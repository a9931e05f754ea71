"""Multi-scale deformable attention: native op vs the grid_sample reference.

    .venv/bin/python benchmarks/msda.py                  # both DINO shapes, 2 threads
    .venv/bin/python benchmarks/msda.py --shape decoder --repeats 21
    python benchmarks/msda.py --device cuda --batch 8   # on a GPU machine
    python benchmarks/msda.py --device cuda --dtype bfloat16 --json msda.json

Shapes (DINO-4scale at a 512x512 input): levels 64^2, 32^2, 16^2, 8^2 (S = 5440), M = 8
heads, D = 32 channels per head, P = 4 points, N = 2; encoder Lq = 5440 (one query per pixel),
decoder Lq = 900. Sampling locations are DINO-like: reference points (pixel centres for the
encoder, uniform for the decoder) plus offsets of a few pixels per level (N(0, 2 px)), softmax
attention weights over L * P; `--locations uniform` samples uniformly in [0, 1] instead.

Timing: the native and reference variants run interleaved in one loop (warm-up first),
medians over --repeats; ratios are reference / native measured in the same run.

--dtype sets the value's dtype (the op takes float32 locations and weights whatever the
value's dtype, as under autocast); the reference then runs grid_sample in that dtype.
--json writes the medians, ratios and peaks per shape to a file.

Peak memory: each implementation runs in a fresh subprocess that builds its inputs, records
the peak resident set size (VmHWM), runs one forward and one forward+backward, and
reports how far the peak rose above that baseline. This counts every byte the pass touched
(outputs, gradients, intermediates, allocator slack) for either implementation alike;
tracemalloc does not see torch's allocations.

On CUDA, times are taken after torch.cuda.synchronize() and peak memory is
torch.cuda.max_memory_allocated() above the inputs, measured in this process.

Physical limit: the benchmark counts the bytes of value rows each pass gathers (4 corners x D
channels per sample, plus the grad_value read-modify-write in backward) and the multiply-adds,
and compares them with a measured matmul FLOP rate and streaming bandwidth on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LEVELS = ((64, 64), (32, 32), (16, 16), (8, 8))
QUERIES = {"encoder": 5440, "decoder": 900}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int = 2
    heads: int = 8
    channels: int = 32
    points: int = 4
    queries: int = 5440

    @property
    def value_len(self) -> int:
        return sum(h * w for h, w in LEVELS)

    @property
    def samples(self) -> int:
        return self.batch * self.queries * self.heads * len(LEVELS) * self.points


def make_inputs(shape: Shape, locations: str, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    n, m, d, p, lq, nl = shape.batch, shape.heads, shape.channels, shape.points, shape.queries, len(LEVELS)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(n, shape.value_len, m, d, generator=gen)
    if locations == "uniform":
        loc = torch.rand(n, lq, m, nl, p, 2, generator=gen)
    else:
        if shape.name == "encoder":  # one query per pixel of every level, at its centre
            centres = []
            for h, w in LEVELS:
                ys, xs = torch.meshgrid(
                    (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
                )
                centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
            ref = torch.cat(centres)[None].expand(n, lq, 2)
        else:
            ref = torch.rand(n, lq, 2, generator=gen) * 0.9 + 0.05
        wh = spatial_shapes.flip(1).to(torch.float32)  # (W, H) per level
        offsets = torch.randn(n, lq, m, nl, p, 2, generator=gen) * 2.0 / wh[:, None, :]
        loc = ref[:, :, None, None, None, :] + offsets
    logits = torch.randn(n, lq, m, nl * p, generator=gen)
    weights = logits.softmax(-1).view(n, lq, m, nl, p)
    return value.to(dtype), spatial_shapes, level_start_index, loc, weights


def _implementations():
    from dino_scale.ops import NATIVE, ms_deform_attn, ms_deform_attn_reference

    if NATIVE is None:
        sys.exit("native op not available: build it with `pip install --no-build-isolation -e .`")
    def reference(value, shapes, starts, loc, weights):
        # grid_sample wants one dtype: the reference computes in the value's
        return ms_deform_attn_reference(value, shapes, starts, loc.to(value.dtype), weights.to(value.dtype))

    return {"native": ms_deform_attn, "reference": reference}


def _forward(fn, inputs):
    with torch.no_grad():
        fn(*inputs)


def _forward_backward(fn, inputs):
    value, shapes, starts, loc, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(shape: Shape, locations: str, repeats: int, device: str,
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    impls = _implementations()
    inputs = tuple(t.to(device) for t in make_inputs(shape, locations, dtype=dtype))
    runs = [(f"{impl} {mode}", fn, step) for mode, step in (("fwd", _forward), ("fwd+bwd", _forward_backward))
            for impl, fn in impls.items()]
    for _, fn, step in runs:  # warm-up
        step(fn, inputs)
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(repeats):
        for name, fn, step in runs:
            _sync(device)
            start = time.perf_counter()
            step(fn, inputs)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this address space; ru_maxrss survives exec and would start at the
    # parent's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory_child(shape: Shape, locations: str, impl: str,
                         dtype: torch.dtype = torch.float32) -> dict[str, int]:
    fn = _implementations()[impl]
    inputs = make_inputs(shape, locations, dtype=dtype)
    baseline = _peak_rss_bytes()
    _forward(fn, inputs)
    forward_peak = _peak_rss_bytes()
    _forward_backward(fn, inputs)
    return {"fwd": forward_peak - baseline, "fwd+bwd": _peak_rss_bytes() - baseline}


def measure_memory_cuda(shape: Shape, locations: str, impl: str,
                        dtype: torch.dtype = torch.float32) -> dict[str, int]:
    fn = _implementations()[impl]
    inputs = tuple(t.cuda() for t in make_inputs(shape, locations, dtype=dtype))
    result = {}
    for mode, step in (("fwd", _forward), ("fwd+bwd", _forward_backward)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step(fn, inputs)
        torch.cuda.synchronize()
        result[mode] = torch.cuda.max_memory_allocated() - baseline
    return result


def measure_memory(shape: Shape, locations: str, impl: str, threads: int, device: str,
                   dtype: torch.dtype = torch.float32) -> dict[str, int]:
    if device == "cuda":
        return measure_memory_cuda(shape, locations, impl, dtype)
    cmd = [sys.executable, __file__, "--memory-child", impl, "--shape", shape.name,
           "--locations", locations, "--threads", str(threads), "--batch", str(shape.batch),
           "--dtype", str(dtype).removeprefix("torch.")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine_peaks() -> tuple[float, float]:
    """Measured float32 matmul rate (FLOP/s) and streaming bandwidth (bytes/s, read + write)."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    flops = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        flops.append(2 * 1024**3 / (time.perf_counter() - start))
    src = torch.ones(64 << 20 >> 2)
    dst = torch.empty_like(src)
    bandwidth = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        bandwidth.append(2 * src.numel() * 4 / (time.perf_counter() - start))
    return max(flops), max(bandwidth)


def work(shape: Shape) -> dict[str, dict[str, float]]:
    """Multiply-adds (as 2 FLOPs) and gathered value bytes per pass, float32."""
    s, d = shape.samples, shape.channels
    row = d * 4
    fwd = {"flop": s * 4 * d * 2, "gathered": s * 4 * row}
    # backward: 4 corner dots + 4 grad_value axpys per sample, value rows read and grad_value
    # rows read and written.
    bwd = {"flop": s * 8 * d * 2, "gathered": s * 4 * row * 3}
    # DRAM floor: every input and output tensor streamed once.
    n, lq, m, nl, p = shape.batch, shape.queries, shape.heads, len(LEVELS), shape.points
    value = n * shape.value_len * m * d * 4
    loc_attn = n * lq * m * nl * p * 3 * 4
    out = n * lq * m * d * 4
    fwd["dram"] = value + loc_attn + out
    # reads value, locations, weights and grad_out; writes their three gradients
    bwd["dram"] = 2 * value + 2 * loc_attn + out
    return {"fwd": fwd, "fwd+bwd": {k: fwd[k] + bwd[k] for k in fwd}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["encoder", "decoder", "both"], default="both")
    parser.add_argument("--locations", choices=["dino", "uniform"], default="dino")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32",
                        help="dtype of the value tensor")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", choices=["native", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = ["encoder", "decoder"] if args.shape == "both" else [args.shape]
    shapes = [Shape(name, batch=args.batch, queries=QUERIES[name]) for name in names]
    if args.memory_child:
        print(json.dumps(measure_memory_child(shapes[0], args.locations, args.memory_child, dtype)))
        return

    from dino_scale.hardware import cpu_features_line
    from dino_scale.ops import NATIVE

    peak_flops, peak_bw = machine_peaks() if args.device == "cpu" else (math.nan, math.nan)
    figures: dict = {"torch": torch.__version__, "device": args.device, "dtype": args.dtype,
                     "native": NATIVE, "repeats": args.repeats, "shapes": {}}
    print(f"torch {torch.__version__}, {args.device}, value {args.dtype}, {args.threads} threads, native op: {NATIVE}, "
          f"locations: {args.locations}, medians of {args.repeats} interleaved runs")
    print(f"machine: matmul {peak_flops / 1e9:.0f} GFLOP/s, streaming copy {peak_bw / 1e9:.1f} GB/s; "
          f"{cpu_features_line()}")
    figures["cpu_features"] = cpu_features_line()
    for shape in shapes:
        print(f"\n{shape.name}: N={shape.batch} Lq={shape.queries} M={shape.heads} "
              f"D={shape.channels} L={len(LEVELS)} P={shape.points} S={shape.value_len} "
              f"({shape.samples / 1e6:.2f} M samples)")
        times = time_interleaved(shape, args.locations, args.repeats, args.device, dtype)
        memory = {}
        if not args.no_memory:
            memory = {impl: measure_memory(shape, args.locations, impl, args.threads, args.device, dtype)
                      for impl in ("native", "reference")}
        figures["shapes"][shape.name] = {
            "queries": shape.queries, "batch": shape.batch, "seconds": times,
            "speedup": {mode: times[f"reference {mode}"] / times[f"native {mode}"] for mode in ("fwd", "fwd+bwd")},
            "peak_bytes": memory,
        }
        amounts = work(shape)
        for mode in ("fwd", "fwd+bwd"):
            native_t, ref_t = times[f"native {mode}"], times[f"reference {mode}"]
            line = (f"  {mode:8s} native {native_t * 1e3:8.2f} ms  reference {ref_t * 1e3:8.2f} ms"
                    f"  speed-up {ref_t / native_t:5.1f}x")
            if memory:
                nm, rm = memory["native"][mode], memory["reference"][mode]
                line += (f"  | peak +{nm / 2**20:6.1f} MiB vs +{rm / 2**20:7.1f} MiB"
                         f" ({nm / max(rm, 1):.2f}x)")
            print(line)
            a = amounts[mode]
            if args.device != "cpu":
                print(f"           native: {a['gathered'] / native_t / 1e9:6.1f} GB/s gathered, "
                      f"{a['dram'] / native_t / 1e9:6.1f} GB/s of tensors streamed")
                continue
            bound = max(a["flop"] / peak_flops, a["dram"] / peak_bw)
            print(f"           native: {a['flop'] / native_t / 1e9:5.1f} GFLOP/s, gathers "
                  f"{a['gathered'] / native_t / 1e9:5.1f} GB/s, {native_t / shape.samples * 1e9:5.1f} "
                  f"ns/sample; roofline floor {bound * 1e3:.2f} ms "
                  f"(native at {bound / native_t:.0%} of it)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
