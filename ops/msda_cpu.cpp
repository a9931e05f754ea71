// CPU kernels of multi-scale deformable attention.
//
// value is [N, S, M, D]: for one head the D channels of a pixel are one contiguous row, so
// every bilinear corner is one contiguous read of D values and the channel loop vectorises.
// Forward: parallel over (n, query); one (n, query, head) accumulates its L * P samples in a
//   D-wide register block and writes its output row once.
// Backward: parallel over (n, head); the task owns grad_value[n, :, head, :], so it
//   accumulates without atomics or per-thread copies of grad_value (in a packed [S, D]
//   block, see msda_cpu_kernels.h), and computes grad_value, grad_sampling_locations and
//   grad_attention_weights in one pass over the samples.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
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

template <typename scalar_t>
struct ForwardArgs {
  Geometry geometry;
  const Level* levels;
  const scalar_t* value;
  const at::opmath_type<scalar_t>* locations;
  const at::opmath_type<scalar_t>* weights;
  scalar_t* out;
};

template <typename scalar_t>
struct BackwardArgs {
  Geometry geometry;
  const Level* levels;
  const scalar_t* value;
  const at::opmath_type<scalar_t>* locations;
  const at::opmath_type<scalar_t>* weights;
  const scalar_t* grad_out;
  scalar_t* grad_value;
  at::opmath_type<scalar_t>* grad_locations;
  at::opmath_type<scalar_t>* grad_weights;
};

// The kernels, compiled once per instruction set: the channel loops are a few vector
// instructions wide, so AVX-512 against the x86-64 baseline (SSE2, no FMA) is worth ~2x.
#define MSDA_ISA isa_default
#define MSDA_TARGET
#include "msda_cpu_kernels.h"
#undef MSDA_ISA
#undef MSDA_TARGET

#if defined(__x86_64__) && defined(__GNUC__)
#define MSDA_X86_VARIANTS 1
#define MSDA_ISA isa_avx2
#define MSDA_TARGET __attribute__((target("avx2,fma,f16c")))
#include "msda_cpu_kernels.h"
#undef MSDA_ISA
#undef MSDA_TARGET
#define MSDA_ISA isa_avx512
#define MSDA_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#include "msda_cpu_kernels.h"
#undef MSDA_ISA
#undef MSDA_TARGET
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest instruction set this CPU has, capped like ATen's kernels by
// ATEN_CPU_CAPABILITY=default|avx2|avx512 (read on every call, so tests can switch it).
Isa cpu_isa() {
#ifdef MSDA_X86_VARIANTS
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string limit = cap ? cap : "";
  if (limit != "default" && limit != "avx2" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (limit != "default" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kDefault;
}

template <typename scalar_t, int kChannels>
void run_forward(const ForwardArgs<scalar_t>& args) {
  auto range = &isa_default::forward_range<scalar_t, kChannels>;
#ifdef MSDA_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512: range = &isa_avx512::forward_range<scalar_t, kChannels>; break;
    case Isa::kAvx2: range = &isa_avx2::forward_range<scalar_t, kChannels>; break;
    default: break;
  }
#endif
  const int64_t rows = args.geometry.batch * args.geometry.queries;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { range(args, begin, end); });
}

template <typename scalar_t, int kChannels>
void run_backward(const BackwardArgs<scalar_t>& args) {
  auto range = &isa_default::backward_range<scalar_t, kChannels>;
#ifdef MSDA_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512: range = &isa_avx512::backward_range<scalar_t, kChannels>; break;
    case Isa::kAvx2: range = &isa_avx2::backward_range<scalar_t, kChannels>; break;
    default: break;
  }
#endif
  const int64_t pairs = args.geometry.batch * args.geometry.heads;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) { range(args, begin, end); });
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  const auto levels = check_levels(spatial_shapes, level_start_index, g.value_len);
  auto out = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  if (out.numel() == 0) return out;
  if (samples_nothing(g)) return out.zero_();
  const Operands in = contiguous_operands(value, sampling_locations, attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_static_channels(g.channels, [&](auto channels) {
      const ForwardArgs<scalar_t> args{g, levels.data(), in.value.data_ptr<scalar_t>(),
                                       in.locations.data_ptr<acc_t>(), in.weights.data_ptr<acc_t>(),
                                       out.data_ptr<scalar_t>()};
      run_forward<scalar_t, decltype(channels)::value>(args);
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
  const auto levels = check_levels(spatial_shapes, level_start_index, g.value_len);
  auto grad_value = at::empty(value.sizes(), value.options());
  auto grad_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  if (value.numel() == 0 || samples_nothing(g)) {
    grad_value.zero_();
    grad_locations.zero_();
    grad_weights.zero_();
  } else {
    const Operands in =
        contiguous_operands(value, sampling_locations, attention_weights, grad_output);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                    "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_static_channels(g.channels, [&](auto channels) {
        const BackwardArgs<scalar_t> args{
            g, levels.data(), in.value.data_ptr<scalar_t>(), in.locations.data_ptr<acc_t>(),
            in.weights.data_ptr<acc_t>(), in.grad_output.data_ptr<scalar_t>(),
            grad_value.data_ptr<scalar_t>(),
            grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>()};
        run_backward<scalar_t, decltype(channels)::value>(args);
      });
    });
  }
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace msda
}  // namespace dino_scale

TORCH_LIBRARY_IMPL(dino_scale, CPU, m) {
  m.impl("ms_deform_attn_forward", &dino_scale::msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &dino_scale::msda::backward_cpu);
}
