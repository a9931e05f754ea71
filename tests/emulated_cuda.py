"""CUDA kernels on the CPU: builds tests/cuda_emu sources with g++ and drives them with ctypes.

`build_libraries` compiles several emulated libraries at once (the kernels of
ops/msda_cuda_kernels.cuh, mutants of them, the emulator's own test kernels). `EmulatedMsda`
stands in for the host side of ops/msda_cuda.cu on CPU tensors: it allocates the outputs as
that file does and calls the same launch functions, which run the kernels on the emulator.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops"
EMU = Path(__file__).resolve().parent / "cuda_emu"
KERNELS = OPS / "msda_cuda_kernels.cuh"

CXX_FLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]


class EmulatorError(RuntimeError):
    """A misuse of the CUDA execution model that the emulator caught during a launch."""


class CompileError(RuntimeError):
    pass


def compile_command(source: Path, output: Path, include_dirs: list[Path] = ()) -> list[str]:
    includes = [f"-I{d}" for d in include_dirs] + [f"-I{OPS}", f"-I{EMU}"]
    torch_include = Path(torch.__file__).parent / "include"  # c10::Half, c10::BFloat16
    return [os.environ.get("CXX", "g++"), *CXX_FLAGS, *includes, f"-isystem{torch_include}",
            str(source), "-o", str(output)]


def build_libraries(jobs: dict[str, list[str]]) -> dict[str, Path | CompileError]:
    """Runs the compile commands concurrently; the output path (the word after -o) of each
    that succeeded, or its CompileError."""
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    results: dict[str, Path | CompileError] = {}
    for name, proc in procs.items():
        log, _ = proc.communicate()
        cmd = jobs[name]
        if proc.returncode == 0:
            results[name] = Path(cmd[cmd.index("-o") + 1])
        else:
            results[name] = CompileError(f"{name}: {' '.join(cmd)}\n{log[-4000:]}")
    return results


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_ptr = ctypes.c_void_p


def _call(fn, *args) -> None:
    error = ctypes.create_string_buffer(4096)
    if fn(*args, error, len(error)) != 0:
        raise EmulatorError(error.value.decode(errors="replace"))


class EmulatedMsda:
    """ms_deform_attn forward and backward on the emulated CUDA kernels (CPU tensors)."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        self._forward = lib.msda_emu_forward
        self._forward.argtypes = [ctypes.c_int] + [_ptr] * 7 + [ctypes.c_char_p, ctypes.c_int]
        self._backward = lib.msda_emu_backward
        self._backward.argtypes = [ctypes.c_int] + [_ptr] * 10 + [ctypes.c_char_p, ctypes.c_int]

    @staticmethod
    def _geometry(value, sampling_locations) -> torch.Tensor:
        n, s, m, d = value.shape
        _, lq, _, levels, points, _ = sampling_locations.shape
        return torch.tensor([n, s, m, d, levels, points, lq], dtype=torch.int64)

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """As forward_cuda: zeroed output, contiguous operands, one launch. `geometry`
        overrides the sizes the kernels see (for launch-limit tests)."""
        value, shapes, starts, loc, weights = (
            t.contiguous() for t in (value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
        )
        n, _, m, d = value.shape
        out = torch.zeros(n, loc.shape[1], m * d, dtype=value.dtype)
        geometry = self._geometry(value, loc) if geometry is None else geometry
        _call(self._forward, _DTYPE_CODES[value.dtype], geometry.data_ptr(), value.data_ptr(),
              shapes.data_ptr(), starts.data_ptr(), loc.data_ptr(), weights.data_ptr(),
              out.data_ptr())
        return out

    def backward(self, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, grad_output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As backward_cuda: gradients zeroed, grad_value accumulated in the accumulate
        dtype (float32 for half types) and rounded once."""
        value, shapes, starts, loc, weights, grad_out = (
            t.contiguous() for t in (value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights, grad_output)
        )
        acc = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc)
        grad_loc = torch.zeros_like(loc)
        grad_weights = torch.zeros_like(weights)
        geometry = self._geometry(value, loc)
        _call(self._backward, _DTYPE_CODES[value.dtype], geometry.data_ptr(),
              value.data_ptr(), shapes.data_ptr(), starts.data_ptr(), loc.data_ptr(),
              weights.data_ptr(), grad_out.data_ptr(), grad_value.data_ptr(),
              grad_loc.data_ptr(), grad_weights.data_ptr())
        return grad_value.to(value.dtype), grad_loc, grad_weights

    def function(self):
        """ms_deform_attn through the emulated kernels, differentiable (for gradcheck)."""
        emulated = self

        class MsDeformAttn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value, spatial_shapes, level_start_index, locations, weights):
                ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
                return emulated.forward(value, spatial_shapes, level_start_index, locations,
                                        weights)

            @staticmethod
            def backward(ctx, grad_output):
                value, shapes, starts, locations, weights = ctx.saved_tensors
                grads = emulated.backward(value, shapes, starts, locations, weights, grad_output)
                return grads[0], None, None, grads[1], grads[2]

        return MsDeformAttn.apply
