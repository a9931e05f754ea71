// Kernels that exercise the emulator itself (tests/test_cuda_emulator.py): a correct one per
// feature, and one per misuse that a GPU punishes and the emulator must refuse.
#include "cuda_emu.h"

#include <cstdio>
#include <cstring>
#include <string>

namespace {

// Block sums through shared memory, a barrier, a warp reduction and a global atomic.
__global__ void block_sum(const float* in, float* total, int n) {
  __shared__ float warp_sums[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += warp_sums[w];
    atomicAdd(total, s);
  }
}

// out[4 * t + k]: what thread t reads from __shfl_sync / _up / _down / _xor with width 16
// and argument 3, each lane offering its own index (2-D blocks: lanes count x fastest).
__global__ void shuffles(int* out) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  out[4 * t + 0] = __shfl_sync(0xffffffffu, t, 3, 16);
  out[4 * t + 1] = __shfl_up_sync(0xffffffffu, t, 3, 16);
  out[4 * t + 2] = __shfl_down_sync(0xffffffffu, t, 3, 16);
  out[4 * t + 3] = __shfl_xor_sync(0xffffffffu, t, 3, 16);
}

// Two half-warps shuffle at once, each within its own mask, then the whole warp.
__global__ void half_warps(int* out) {
  const int lane = threadIdx.x;
  int v = lane;
  if (lane < 16) {
    v += __shfl_xor_sync(0x0000ffffu, v, 1);
  } else {
    v += __shfl_xor_sync(0xffff0000u, v, 2);
  }
  __syncwarp();
  out[lane] = __shfl_sync(0xffffffffu, v, 31 - lane);
}

// Half a warp meets at its own __syncwarp while the other half already waits at the
// whole warp's, which the first half reaches next.
__global__ void staggered_syncwarps(int* out) {
  if (threadIdx.x < 16) __syncwarp(0x0000ffffu);
  __syncwarp();
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_in_mask(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void full_mask_in_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shuffle_and_syncwarp(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  } else {
    __syncwarp();
  }
}

__global__ void shuffles_at_two_sites(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.0f, 16);
  }
}

__global__ void barrier_after_early_exit(float* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_against_shuffle(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void write_one(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f; }

}  // namespace

// Runs kernel `name`; 0, or 1 with the emulator's error in error.
extern "C" int emu_run(const char* name, void* data, int n, char* error, int error_len) {
  const std::string k = name;
  float* f = static_cast<float*>(data);
  try {
    if (k == "block_sum") {
      ::cuda_emu::launch(block_sum, dim3((n + 127) / 128), dim3(128), 0, nullptr)(f, f + n, n);
    } else if (k == "shuffles") {
      ::cuda_emu::launch(shuffles, dim3(1), dim3(8, 8), 0, nullptr)(static_cast<int*>(data));
    } else if (k == "half_warps") {
      ::cuda_emu::launch(half_warps, dim3(1), dim3(32), 0, nullptr)(static_cast<int*>(data));
    } else if (k == "staggered_syncwarps") {
      ::cuda_emu::launch(staggered_syncwarps, dim3(1), dim3(32), 0, nullptr)(static_cast<int*>(data));
    } else if (k == "exited_lane_in_mask") {
      ::cuda_emu::launch(exited_lane_in_mask, dim3(1), dim3(32), 0, nullptr)(f);
    } else if (k == "full_mask_in_partial_warp") {
      ::cuda_emu::launch(full_mask_in_partial_warp, dim3(1), dim3(48), 0, nullptr)(f);
    } else if (k == "shuffle_and_syncwarp") {
      ::cuda_emu::launch(shuffle_and_syncwarp, dim3(1), dim3(32), 0, nullptr)(f);
    } else if (k == "shuffles_at_two_sites") {
      ::cuda_emu::launch(shuffles_at_two_sites, dim3(1), dim3(32), 0, nullptr)(f);
    } else if (k == "barrier_after_early_exit") {
      ::cuda_emu::launch(barrier_after_early_exit, dim3(2), dim3(128), 0, nullptr)(f);
    } else if (k == "barrier_against_shuffle") {
      ::cuda_emu::launch(barrier_against_shuffle, dim3(1), dim3(32), 0, nullptr)(f);
    } else if (k == "zero_blocks") {
      ::cuda_emu::launch(write_one, dim3(0), dim3(32), 0, nullptr)(f);
    } else if (k == "too_many_threads") {
      ::cuda_emu::launch(write_one, dim3(1), dim3(1025), 0, nullptr)(f);
    } else {
      std::snprintf(error, static_cast<size_t>(error_len), "no kernel %s", name);
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<size_t>(error_len), "%s", e.what());
    return 1;
  }
}
