// Per-sample arithmetic of multi-scale deformable attention, shared by the CPU kernel
// (msda_cpu.cpp) and the CUDA kernel (msda_cuda.cu).
//
// One "sample" is a sampling location (x, y) in [0, 1] on one feature level of size H x W.
// Bilinear interpolation follows grid_sample(align_corners=False, padding_mode="zeros"):
// pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H), and corners outside the map
// contribute zero. The kernels own the channel loop; this header owns everything per sample:
// which four pixels are read, with which weights, and how the four per-corner dot products
// of the backward pass turn into gradients for the location and the attention weight.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_UNROLL
#endif

namespace dino_scale {
namespace msda {

// Sizes of one call: value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2].
struct Geometry {
  int64_t batch, value_len, heads, channels, levels, points, queries;
};

// True when no query samples anything: the output and every gradient are zero.
inline bool samples_nothing(const Geometry& g) {
  return g.queries == 0 || g.levels == 0 || g.points == 0 || g.channels == 0;
}

// The dtype the kernels accumulate in (at::opmath_type without ATen): float32 for
// float32/bfloat16/float16 values, float64 for float64.
template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

MSDA_HOST_DEVICE float floor_of(float v) { return floorf(v); }
MSDA_HOST_DEVICE double floor_of(double v) { return floor(v); }

// The four corners of one bilinear sample, in the order
// (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
// Pixel indices are 32-bit (levels have far fewer than 2^31 pixels; the entry points check),
// which lets the CPU compiler vectorise a loop of these calls over samples.
template <typename acc_t>
struct Corners {
  int32_t pixel[4];   // index of the corner inside its level (row-major y * W + x), -1 if outside
  acc_t weight[4];    // bilinear weight, 0 where the corner is outside
  acc_t lx, ly;       // fractional position inside the cell, needed by the backward pass
};

// Corners and weights of the sample at normalised location (loc_x, loc_y) on an H x W level.
// A sample whose whole footprint lies outside the map has all four corners outside; so has a
// non-finite location, whose lx and ly are then 0 so that no NaN reaches the gradients.
template <typename acc_t>
MSDA_HOST_DEVICE Corners<acc_t> bilinear_corners(acc_t loc_x, acc_t loc_y, int32_t height,
                                                 int32_t width) {
  Corners<acc_t> c;
  // Pixel coordinates with centres on integers (align_corners=False).
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t fx = floor_of(x);
  const acc_t fy = floor_of(y);
  // Locations far outside (or NaN) must not overflow the integer conversion below.
  const bool in_range = fx > acc_t(-2) && fy > acc_t(-2) && fx < static_cast<acc_t>(width) &&
                        fy < static_cast<acc_t>(height);
  c.lx = in_range ? x - fx : acc_t(0);
  c.ly = in_range ? y - fy : acc_t(0);
  const acc_t hx = acc_t(1) - c.lx;
  const acc_t hy = acc_t(1) - c.ly;
  const int32_t x0 = in_range ? static_cast<int32_t>(fx) : -2;
  const int32_t y0 = in_range ? static_cast<int32_t>(fy) : -2;
  const acc_t w[4] = {hy * hx, hy * c.lx, c.ly * hx, c.ly * c.lx};
MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    const int32_t cy = y0 + (k >> 1);
    const int32_t cx = x0 + (k & 1);
    const bool inside = cy >= 0 && cy < height && cx >= 0 && cx < width;
    c.pixel[k] = inside ? cy * width + cx : -1;
    c.weight[k] = inside ? w[k] : acc_t(0);
  }
  return c;
}

MSDA_HOST_DEVICE bool all_outside(const int32_t pixel[4]) {
  return (pixel[0] & pixel[1] & pixel[2] & pixel[3]) < 0;
}

// Gradients of one sample's contribution  attn * sum_k weight_k * <value_k, grad_out>.
// corner_dot[k] = <value at corner k, grad_out> over the channels (0 for corners outside).
// A sample entirely outside the map (non-finite locations included) has zero gradients,
// whatever its attention weight.
template <typename acc_t>
struct SampleGradsT {
  acc_t grad_attn;   // d / d attention_weight
  acc_t grad_loc_x;  // d / d sampling_location x (normalised)
  acc_t grad_loc_y;  // d / d sampling_location y (normalised)
};

template <typename acc_t>
MSDA_HOST_DEVICE SampleGradsT<acc_t> sample_grads(const Corners<acc_t>& c, const acc_t corner_dot[4],
                                                  acc_t attn, int32_t height, int32_t width) {
  SampleGradsT<acc_t> g;
  if (all_outside(c.pixel)) {
    g.grad_attn = g.grad_loc_x = g.grad_loc_y = acc_t(0);
    return g;
  }
  g.grad_attn = c.weight[0] * corner_dot[0] + c.weight[1] * corner_dot[1] +
                c.weight[2] * corner_dot[2] + c.weight[3] * corner_dot[3];
  const acc_t hx = acc_t(1) - c.lx;
  const acc_t hy = acc_t(1) - c.ly;
  // d(bilinear)/dx in pixels, times dx/dloc_x = W (same for y with H).
  const acc_t d_dx = hy * (corner_dot[1] - corner_dot[0]) + c.ly * (corner_dot[3] - corner_dot[2]);
  const acc_t d_dy = hx * (corner_dot[2] - corner_dot[0]) + c.lx * (corner_dot[3] - corner_dot[1]);
  g.grad_loc_x = attn * d_dx * static_cast<acc_t>(width);
  g.grad_loc_y = attn * d_dy * static_cast<acc_t>(height);
  return g;
}

}  // namespace msda
}  // namespace dino_scale
