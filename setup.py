"""Build glue for the native multi-scale deformable attention op (sources in ops/).

The CPU kernel is always built. The CUDA kernel is built too when torch is a CUDA build and
nvcc is found (no GPU needed), unless DINO_SCALE_BUILD_CUDA=0; DINO_SCALE_BUILD_CUDA=1 makes a
missing toolkit an error instead of a silent CPU-only build. Both end up in one extension
module, dino_scale.ops._C, which registers torch.ops.dino_scale.* when imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
OPS = ROOT / "ops"
# T4 (sm_75), A100 (sm_80), A10/A40/RTX 30xx (sm_86), L4/L40 (sm_89), H100/H200 (sm_90), and
# PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _default_cuda_env() -> None:
    # Must run before torch.utils.cpp_extension reads CUDA_HOME at import. Without it torch
    # guesses /usr/local from a /usr/local/bin/nvcc wrapper, and without an arch list it
    # queries GPUs (IndexError when there are none).
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)


def _want_cuda() -> bool:
    flag = os.environ.get("DINO_SCALE_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils import cpp_extension

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on") and not available:
        raise RuntimeError(
            "DINO_SCALE_BUILD_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return available


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of torch's nvidia-* wheels (cusparse, cublas, ...) that ATen's CUDA headers
    include and a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(str(p) for p in Path(base).glob("*/include") if p.is_dir())
    return dirs


def extension_kwargs(with_cuda: bool) -> dict:
    """Sources and compiler flags of the extension."""
    # setuptools wants source paths relative to setup.py.
    sources = ["ops/msda_library.cpp", "ops/msda_cpu.cpp"]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
    kwargs: dict = {
        "sources": sources,
        "include_dirs": [str(OPS)],
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
    }
    if with_cuda:
        sources.append("ops/msda_cuda.cu")
        kwargs["include_dirs"] += _pip_cuda_include_dirs()
        kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
    return kwargs


def _ext_modules() -> tuple[list, dict]:
    _default_cuda_env()
    from torch.utils import cpp_extension

    with_cuda = _want_cuda()
    kwargs = extension_kwargs(with_cuda)
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    headers = sorted([*OPS.glob("*.h"), *OPS.glob("*.cuh")])
    ext = make(name="dino_scale.ops._C", depends=[str(p.relative_to(ROOT)) for p in headers], **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _ext_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
