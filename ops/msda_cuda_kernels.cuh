// CUDA kernels of multi-scale deformable attention and their launches, with no ATen: nvcc
// compiles them through msda_cuda.cu, and tests/cuda_emu compiles them with g++ for the
// CPU emulator of CUDA's execution model.
//
// Thread mapping: one warp per (n, query, head); lane c handles channel c (and c + 32, ...
// for heads wider than 32). value is [N, S, M, D], so the 32 lanes reading one bilinear
// corner read one contiguous row: a coalesced 128-byte load for D = 32 float32.
// Forward: every lane walks the L * P samples of its (n, query, head), accumulates its
//   channel in float32 (float64 for float64) and writes it once; no shared memory.
// Backward: the same walk; each lane atomically adds its channel of the four corner
//   gradients into grad_value (coalesced atomics on one row; float32 accumulation buffer for
//   half types), the four corner dot products <value_k, grad_out> are reduced with warp
//   shuffles, and lane 0 turns them into the sample's location and attention-weight
//   gradients (msda_core.h), which have a single writer and need no atomics.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "msda_core.h"

// Kernel launches go through this macro so that the emulator can replace the
// triple-chevron syntax, which is not C++.
#ifndef MSDA_LAUNCH
#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#endif

namespace dino_scale {
namespace msda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
static_assert(kThreads % kWarp == 0, "a block must be whole warps: the shuffles name 32 lanes");
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x

template <typename scalar_t>
__global__ void forward_kernel(Geometry g, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const acc_type<scalar_t>* __restrict__ locations,
                               const acc_type<scalar_t>* __restrict__ weights,
                               scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= g.batch * g.queries * g.heads) return;
  const int64_t m = warp % g.heads, n = warp / g.heads / g.queries;
  const int64_t D = g.channels, row_stride = g.heads * D;
  const scalar_t* value_nm = value + n * g.value_len * row_stride + m * D;
  const int64_t sample0 = warp * g.levels * g.points;
  for (int64_t c = lane; c < D; c += kWarp) {
    acc_t acc = 0;
    for (int64_t l = 0; l < g.levels; ++l) {
      const int32_t height = static_cast<int32_t>(shapes[2 * l]);
      const int32_t width = static_cast<int32_t>(shapes[2 * l + 1]);
      const scalar_t* level_value = value_nm + starts[l] * row_stride + c;
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t s = sample0 + l * g.points + p;
        const Corners<acc_t> cr =
            bilinear_corners<acc_t>(locations[2 * s], locations[2 * s + 1], height, width);
        const acc_t a = weights[s];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (cr.pixel[k] >= 0) {
            acc += a * cr.weight[k] * static_cast<acc_t>(level_value[cr.pixel[k] * row_stride]);
          }
        }
      }
    }
    out[warp * D + c] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t>
__global__ void backward_kernel(Geometry g, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const acc_type<scalar_t>* __restrict__ locations,
                                const acc_type<scalar_t>* __restrict__ weights,
                                const scalar_t* __restrict__ grad_out,
                                acc_type<scalar_t>* __restrict__ grad_value,
                                acc_type<scalar_t>* __restrict__ grad_locations,
                                acc_type<scalar_t>* __restrict__ grad_weights) {
  using acc_t = acc_type<scalar_t>;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  // The whole warp leaves together, so the shuffles below always see 32 lanes.
  if (warp >= g.batch * g.queries * g.heads) return;
  const int64_t m = warp % g.heads, n = warp / g.heads / g.queries;
  const int64_t D = g.channels, row_stride = g.heads * D;
  const int64_t nm_offset = n * g.value_len * row_stride + m * D;
  const int64_t sample0 = warp * g.levels * g.points;
  // Lanes past D take part in the shuffles with zeros.
  for (int64_t c0 = 0; c0 < D; c0 += kWarp) {
    const int64_t c = c0 + lane;
    const bool active = c < D;
    const acc_t grad_c = active ? static_cast<acc_t>(grad_out[warp * D + c]) : acc_t(0);
    for (int64_t l = 0; l < g.levels; ++l) {
      const int32_t height = static_cast<int32_t>(shapes[2 * l]);
      const int32_t width = static_cast<int32_t>(shapes[2 * l + 1]);
      const int64_t level_offset = nm_offset + starts[l] * row_stride + c;
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t s = sample0 + l * g.points + p;
        const Corners<acc_t> cr =
            bilinear_corners<acc_t>(locations[2 * s], locations[2 * s + 1], height, width);
        const acc_t a = weights[s];
        acc_t dot[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dot[k] = 0;
          if (active && cr.pixel[k] >= 0) {
            const int64_t at_row = level_offset + cr.pixel[k] * row_stride;
            dot[k] = grad_c * static_cast<acc_t>(value[at_row]);
            atomicAdd(grad_value + at_row, a * cr.weight[k] * grad_c);
          }
          dot[k] = warp_sum(dot[k]);
        }
        if (lane == 0) {
          const SampleGradsT<acc_t> sg = sample_grads<acc_t>(cr, dot, a, height, width);
          if (c0 == 0) {
            grad_weights[s] = sg.grad_attn;
            grad_locations[2 * s] = sg.grad_loc_x;
            grad_locations[2 * s + 1] = sg.grad_loc_y;
          } else {  // wider heads: the channel chunks add up
            grad_weights[s] += sg.grad_attn;
            grad_locations[2 * s] += sg.grad_loc_x;
            grad_locations[2 * s + 1] += sg.grad_loc_y;
          }
        }
      }
    }
  }
}

inline int64_t blocks_for(const Geometry& g) {
  const int64_t threads = g.batch * g.queries * g.heads * kWarp;
  return (threads + kThreads - 1) / kThreads;
}

// Throws (before any launch) when one grid cannot hold a warp per (n, query, head).
inline void check_grid(const Geometry& g) {
  if (blocks_for(g) > kMaxBlocks) {
    throw std::runtime_error(
        "ms_deform_attn: sampling_locations [N, Lq, M, L, P, 2] has N * Lq * M = " +
        std::to_string(g.batch * g.queries * g.heads) + " (n, query, head) triples, more than " +
        "one CUDA launch covers (" + std::to_string(kMaxBlocks * (kThreads / kWarp)) + ")");
  }
}

// The launches: nothing is launched when there is nothing to compute (the caller zeroes the
// outputs).
template <typename scalar_t>
void launch_forward(const Geometry& g, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const acc_type<scalar_t>* locations,
                    const acc_type<scalar_t>* weights, scalar_t* out, cudaStream_t stream) {
  check_grid(g);
  if (blocks_for(g) == 0 || samples_nothing(g)) return;
  MSDA_LAUNCH(forward_kernel<scalar_t>, blocks_for(g), kThreads, 0, stream)(
      g, value, shapes, starts, locations, weights, out);
}

template <typename scalar_t>
void launch_backward(const Geometry& g, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const acc_type<scalar_t>* locations,
                     const acc_type<scalar_t>* weights, const scalar_t* grad_out,
                     acc_type<scalar_t>* grad_value, acc_type<scalar_t>* grad_locations,
                     acc_type<scalar_t>* grad_weights, cudaStream_t stream) {
  check_grid(g);
  if (blocks_for(g) == 0 || samples_nothing(g)) return;
  MSDA_LAUNCH(backward_kernel<scalar_t>, blocks_for(g), kThreads, 0, stream)(
      g, value, shapes, starts, locations, weights, grad_out, grad_value, grad_locations,
      grad_weights);
}

}  // namespace msda
}  // namespace dino_scale
