"""Loading the native op (ops/ at the repository root) and its Python-side registrations.

The extension registers `torch.ops.dino_scale.ms_deform_attn_forward` / `_backward` with
CPU (and, when built with nvcc, CUDA) kernels. This module adds what the dispatcher needs
from Python: fake kernels (shape propagation for torch.compile and meta tensors) and the
autograd formula, so `opcheck`, `gradcheck` and `torch.compile` work on the op.

Load order: the installed extension `dino_scale.ops._C`; else a JIT build of the same sources
(only from a source checkout; set DINO_SCALE_MSDA_JIT=0 to skip it); else nothing, and
`dino_scale.ops.ms_deform_attn` falls back to the pure-PyTorch reference. Each fallback warns
once, naming what fell back and why.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parents[2] / "ops"
JIT_NAME = "dino_scale_msda_jit"


def _qualified(name: str) -> str:
    return f"dino_scale::{name}"


def _registered() -> bool:
    return hasattr(torch.ops, "dino_scale") and hasattr(
        torch.ops.dino_scale, "ms_deform_attn_forward"
    )


def _jit_build(reason: str) -> str | None:
    """Builds ops/ with torch.utils.cpp_extension.load; returns an error string on failure."""
    if os.environ.get("DINO_SCALE_MSDA_JIT", "1") == "0":
        return "JIT build disabled by DINO_SCALE_MSDA_JIT=0"
    if not (SOURCE_DIR / "msda_cpu.cpp").exists():
        return f"no native sources at {SOURCE_DIR} to JIT-build"
    # As in setup.py: torch reads CUDA_HOME when cpp_extension is first imported and would
    # otherwise guess /usr/local from a /usr/local/bin/nvcc wrapper.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    sources = [SOURCE_DIR / "msda_library.cpp", SOURCE_DIR / "msda_cpu.cpp"]
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources.append(SOURCE_DIR / "msda_cuda.cu")
    warnings.warn(
        f"dino_scale.ops: the installed native MSDA extension is unavailable ({reason}); "
        f"JIT-compiling {SOURCE_DIR} ({'CPU+CUDA' if with_cuda else 'CPU'}), this takes a "
        "minute once. Run `pip install --no-build-isolation -e .` to install it.",
        RuntimeWarning,
        stacklevel=3,
    )
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(SOURCE_DIR)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler missing, build error: fall back to the reference
        return f"JIT build failed: {type(exc).__name__}: {exc}"
    return None


def load() -> tuple[str | None, str]:
    """Loads the op into torch.ops.dino_scale. Returns (how, why-not): how is "installed",
    "jit" or None when neither worked; why-not says what failed."""
    if _registered():
        return "installed", ""
    try:
        import dino_scale.ops._C  # noqa: F401  (registers torch.ops.dino_scale.*)

        return "installed", ""
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    error = _jit_build(reason)
    if error is None and _registered():
        return "jit", ""
    return None, f"{reason}; {error}"


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has a kernel for this dispatch key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        _qualified("ms_deform_attn_forward"), device_type
    )


def register_python_kernels() -> None:
    """Fake kernels and the autograd formula of the native op (call once, after load)."""

    @torch.library.register_fake(_qualified("ms_deform_attn_forward"))
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty(batch, sampling_locations.shape[1], heads * channels)

    @torch.library.register_fake(_qualified("ms_deform_attn_backward"))
    def _backward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    ):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.dino_scale.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(
        _qualified("ms_deform_attn_forward"), _backward, setup_context=_setup_context
    )
