// CPU kernels of multi-scale deformable attention.
//
// value is [N, S, M, D]: for one head the D channels of a pixel are one contiguous row, so
// every bilinear corner is one contiguous read of D values and the channel loop vectorises.
// Forward: parallel over (n, query); one (n, query, head) accumulates its L * P samples in a
//   D-wide register block and writes its output row once.
// Backward: parallel over (n, head); the task owns grad_value[n, :, head, :], so it
//   accumulates without atomics or per-thread copies, and computes grad_value,
//   grad_sampling_locations and grad_attention_weights in one pass over the samples.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "msda_checks.h"
#include "msda_core.h"

namespace dino_scale {
namespace msda {
namespace {

// Calls fn with the channel count as a compile-time constant for the common head widths
// (fixed trip counts let the compiler keep the accumulators in vector registers), 0 otherwise.
template <typename Fn>
void with_static_channels(int64_t channels, Fn&& fn) {
  switch (channels) {
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

// Level geometry read once per call.
struct Level {
  int64_t height, width, start;
};

std::vector<Level> read_levels(const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, int64_t value_len) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  std::vector<Level> levels(shapes.size(0));
  int64_t expected_start = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = Level{hw[2 * l], hw[2 * l + 1], st[l]};
    TORCH_CHECK(levels[l].height >= 0 && levels[l].width >= 0,
                "ms_deform_attn: spatial_shapes has a negative size at level ", l);
    TORCH_CHECK(levels[l].start == expected_start, "ms_deform_attn: level_start_index[", l,
                "] is ", levels[l].start, " but the spatial_shapes before it sum to ",
                expected_start);
    expected_start += levels[l].height * levels[l].width;
  }
  TORCH_CHECK(expected_start == value_len, "ms_deform_attn: spatial_shapes sum to ",
              expected_start, " pixels but value has S = ", value_len);
  return levels;
}

template <typename scalar_t, int kChannels>
void forward_kernel(const Geometry& g, const std::vector<Level>& levels, const scalar_t* value,
                    const at::opmath_type<scalar_t>* locations,
                    const at::opmath_type<scalar_t>* weights, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kChannels > 0 ? kChannels : g.channels;
  const int64_t M = g.heads, L = g.levels, P = g.points, S = g.value_len;
  const int64_t row_stride = M * D;  // between pixels of one head
  at::parallel_for(0, g.batch * g.queries, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zero_row(D, scalar_t(0));  // stands in for corners outside the map
    std::vector<acc_t> acc_heap(kChannels > 0 ? 0 : D);
    acc_t acc_stack[kChannels > 0 ? kChannels : 1];
    acc_t* acc = kChannels > 0 ? acc_stack : acc_heap.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const scalar_t* value_n = value + (nq / g.queries) * S * M * D;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
        const int64_t sample0 = (nq * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const Level lv = levels[l];
          const scalar_t* level_value = value_n + lv.start * row_stride + m * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t s = sample0 + l * P + p;
            const Corners<acc_t> c =
                bilinear_corners<acc_t>(locations[2 * s], locations[2 * s + 1], lv.height, lv.width);
            if ((c.pixel[0] & c.pixel[1] & c.pixel[2] & c.pixel[3]) < 0) continue;  // all outside
            const acc_t a = weights[s];
            const scalar_t* r[4];
            acc_t w[4];
            for (int k = 0; k < 4; ++k) {
              r[k] = c.pixel[k] >= 0 ? level_value + c.pixel[k] * row_stride : zero_row.data();
              w[k] = a * c.weight[k];
            }
            const scalar_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
            const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              acc[d] += w0 * acc_t(r0[d]) + w1 * acc_t(r1[d]) + w2 * acc_t(r2[d]) +
                        w3 * acc_t(r3[d]);
            }
          }
        }
        scalar_t* out_row = out + (nq * M + m) * D;
        for (int64_t d = 0; d < D; ++d) out_row[d] = scalar_t(acc[d]);
      }
    }
  });
}

// grad_value_acc is grad_value itself for float32/float64, a float32 buffer for half types.
template <typename scalar_t, int kChannels>
void backward_kernel(const Geometry& g, const std::vector<Level>& levels, const scalar_t* value,
                     const at::opmath_type<scalar_t>* locations,
                     const at::opmath_type<scalar_t>* weights, const scalar_t* grad_out,
                     at::opmath_type<scalar_t>* grad_value_acc,
                     at::opmath_type<scalar_t>* grad_locations,
                     at::opmath_type<scalar_t>* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kChannels > 0 ? kChannels : g.channels;
  const int64_t M = g.heads, L = g.levels, P = g.points, S = g.value_len, Lq = g.queries;
  const int64_t row_stride = M * D;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zero_row(D, scalar_t(0));
    std::vector<acc_t> discard_row(D);  // grad sink for corners outside the map
    std::vector<acc_t> grad_row(D);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / M, m = nm % M;
      const scalar_t* value_nm = value + n * S * M * D + m * D;
      acc_t* grad_value_nm = grad_value_acc + n * S * M * D + m * D;
      for (int64_t s = 0; s < S; ++s) {
        std::memset(grad_value_nm + s * row_stride, 0, D * sizeof(acc_t));
      }
      for (int64_t q = 0; q < Lq; ++q) {
        const scalar_t* go = grad_out + ((n * Lq + q) * M + m) * D;
        for (int64_t d = 0; d < D; ++d) grad_row[d] = acc_t(go[d]);
        const acc_t* gr = grad_row.data();
        const int64_t sample0 = ((n * Lq + q) * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const Level lv = levels[l];
          const scalar_t* level_value = value_nm + lv.start * row_stride;
          acc_t* level_grad = grad_value_nm + lv.start * row_stride;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t s = sample0 + l * P + p;
            const Corners<acc_t> c =
                bilinear_corners<acc_t>(locations[2 * s], locations[2 * s + 1], lv.height, lv.width);
            const acc_t a = weights[s];
            if ((c.pixel[0] & c.pixel[1] & c.pixel[2] & c.pixel[3]) < 0) {
              grad_weights[s] = acc_t(0);
              grad_locations[2 * s] = acc_t(0);
              grad_locations[2 * s + 1] = acc_t(0);
              continue;
            }
            const scalar_t* r[4];
            acc_t* gv[4];
            acc_t wa[4];
            for (int k = 0; k < 4; ++k) {
              const bool inside = c.pixel[k] >= 0;
              r[k] = inside ? level_value + c.pixel[k] * row_stride : zero_row.data();
              gv[k] = inside ? level_grad + c.pixel[k] * row_stride : discard_row.data();
              wa[k] = a * c.weight[k];
            }
            const scalar_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
            acc_t *gv0 = gv[0], *gv1 = gv[1], *gv2 = gv[2], *gv3 = gv[3];
            const acc_t wa0 = wa[0], wa1 = wa[1], wa2 = wa[2], wa3 = wa[3];
            acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
            for (int64_t d = 0; d < D; ++d) {
              const acc_t gd = gr[d];
              dot0 += gd * acc_t(r0[d]);
              dot1 += gd * acc_t(r1[d]);
              dot2 += gd * acc_t(r2[d]);
              dot3 += gd * acc_t(r3[d]);
              gv0[d] += wa0 * gd;
              gv1[d] += wa1 * gd;
              gv2[d] += wa2 * gd;
              gv3[d] += wa3 * gd;
            }
            const acc_t dots[4] = {dot0, dot1, dot2, dot3};
            const SampleGradsT<acc_t> sg = sample_grads<acc_t>(c, dots, a, lv.height, lv.width);
            grad_weights[s] = sg.grad_attn;
            grad_locations[2 * s] = sg.grad_loc_x;
            grad_locations[2 * s + 1] = sg.grad_loc_y;
          }
        }
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  const auto levels = read_levels(spatial_shapes, level_start_index, g.value_len);
  auto out = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  if (out.numel() == 0) return out;
  if (g.levels == 0 || g.points == 0) return out.zero_();
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_static_channels(g.channels, [&](auto channels) {
      forward_kernel<scalar_t, decltype(channels)::value>(
          g, levels, v.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  check_grad_output(grad_output, value, g);
  const auto levels = read_levels(spatial_shapes, level_start_index, g.value_len);
  const auto acc_dtype = accumulate_dtype(value.scalar_type());
  const bool reduced = acc_dtype != value.scalar_type();
  // Half types accumulate grad_value in float32 and round once at the end.
  auto grad_value_acc = at::empty(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  const bool no_samples = g.queries == 0 || g.levels == 0 || g.points == 0 || g.channels == 0;
  if (value.numel() == 0 || no_samples) {
    grad_value_acc.zero_();
    grad_locations.zero_();
    grad_weights.zero_();
  } else {
    const auto v = value.contiguous();
    const auto loc = sampling_locations.contiguous();
    const auto attn = attention_weights.contiguous();
    const auto go = grad_output.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_static_channels(g.channels, [&](auto channels) {
        backward_kernel<scalar_t, decltype(channels)::value>(
            g, levels, v.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
            go.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
            grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>());
      });
    });
  }
  auto grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace msda
}  // namespace dino_scale

TORCH_LIBRARY_IMPL(dino_scale, CPU, m) {
  m.impl("ms_deform_attn_forward", &dino_scale::msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &dino_scale::msda::backward_cpu);
}
