"""The CUDA emulator (tests/cuda_emu) runs correct kernels and refuses what GPUs punish."""

from __future__ import annotations

import ctypes
import platform
import re

import pytest
import torch

from emulated_cuda import EMU, CompileError, build_libraries, compile_command

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="cuda_emu is x86-64 only")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_emu_selftest")
    atomic_source = out / "atomic_add_int64.cpp"
    atomic_source.write_text(
        '#include "cuda_emu.h"\n'
        "__global__ void count(long* n) { atomicAdd(n, 1L); }\n"
        "__global__ void add(float* x) { atomicAdd(x, 1.0); }  // float atomic, double operand\n"
    )
    built = build_libraries({
        "kernels": compile_command(EMU / "selftest_kernels.cpp", out / "selftest.so"),
        "atomic": compile_command(atomic_source, out / "atomic.so"),
    })
    assert not isinstance(built["kernels"], CompileError), built["kernels"]
    lib = ctypes.CDLL(str(built["kernels"]))
    lib.emu_run.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_int]
    return lib, built["atomic"]


def run(selftest, kernel: str, data: torch.Tensor, n: int | None = None) -> str:
    error = ctypes.create_string_buffer(4096)
    rc = selftest[0].emu_run(kernel.encode(), data.data_ptr(), data.numel() if n is None else n,
                             error, len(error))
    assert rc in (0, 1), error.value
    return error.value.decode()


def test_a_block_reduction_with_shuffles_shared_memory_barrier_and_atomics_adds_up(selftest):
    values = torch.arange(1000, dtype=torch.float32)
    data = torch.cat([values, torch.zeros(1)])  # the total lands in the last element
    assert run(selftest, "block_sum", data, n=1000) == ""
    assert data[-1].item() == values.sum().item()


def test_shuffles_read_the_lanes_cuda_documents_within_width_16(selftest):
    out = torch.zeros(64, 4, dtype=torch.int32)  # 8 x 8 threads = two warps
    assert run(selftest, "shuffles", out) == ""
    lane = torch.arange(64)
    base = lane // 16 * 16
    expected = torch.stack([
        base + 3,
        torch.where(lane - 3 >= base, lane - 3, lane),
        torch.where(lane + 3 < base + 16, lane + 3, lane),
        lane ^ 3,
    ], 1)
    assert torch.equal(out.long(), expected)


def test_half_warps_shuffle_within_their_own_masks_at_different_sites(selftest):
    out = torch.zeros(32, dtype=torch.int32)
    assert run(selftest, "half_warps", out) == ""
    lane = torch.arange(32)
    v = torch.where(lane < 16, lane + (lane ^ 1), lane + (lane ^ 2))
    assert torch.equal(out.long(), v.flip(0))


def test_a_half_warp_may_sync_alone_while_the_other_half_waits_for_the_whole_warp(selftest):
    out = torch.zeros(32, dtype=torch.int32)
    assert run(selftest, "staggered_syncwarps", out) == ""
    assert out.eq(1).all()


MISUSES = {
    "exited_lane_in_mask": "names lane 3 of warp 0 in its mask, which has exited",
    "full_mask_in_partial_warp": "names lane 16 of warp 1 in its mask, which does not exist",
    "shuffle_and_syncwarp": r"different collectives: .*__shfl_xor_sync.*__syncwarp",
    "shuffles_at_two_sites": r"different collectives: .*selftest_kernels.cpp:\d+.*"
                             r"selftest_kernels.cpp:\d+",
    "barrier_after_early_exit": r"deadlock: thread 64 of the block has exited, so __syncthreads",
    "barrier_against_shuffle": r"different collectives: .*__shfl_xor_sync.*__syncthreads",
    "zero_blocks": r"invalid launch <<<\(0, 1, 1\), \(32, 1, 1\)>>>: a grid of 0 blocks",
    "too_many_threads": r"invalid launch .*\(1025, 1, 1\).*more than 1024 threads",
}


@pytest.mark.parametrize("kernel", MISUSES, ids=list(MISUSES))
def test_the_emulator_refuses_what_a_gpu_punishes(selftest, kernel):
    error = run(selftest, kernel, torch.zeros(4096))
    assert error, f"{kernel} ran without an error"
    assert re.search(MISUSES[kernel], error), error


def test_atomic_add_on_a_type_sm80_lacks_does_not_compile(selftest):
    failure = selftest[1]
    assert isinstance(failure, CompileError), "atomicAdd(long*, long) compiled"
    log = str(failure)
    assert "sm_80 has no atomicAdd for this type" in log
    # Only the int64 atomic is refused: float atomics with a double operand convert, as in CUDA.
    assert log.count("no atomicAdd for this type") == 1, log
