// CUDA entry points of multi-scale deformable attention: argument checks, outputs, dtype
// dispatch, and the launches of the kernels in msda_cuda_kernels.cuh (see there for the
// thread mapping).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "msda_checks.h"
#include "msda_core.h"
#include "msda_cuda_kernels.cuh"

namespace dino_scale {
namespace msda {
namespace {

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  check_levels(spatial_shapes, level_start_index, g.value_len);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::zeros({g.batch, g.queries, g.heads * g.channels}, value.options());
  const Operands in = contiguous_operands(value, sampling_locations, attention_weights);
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_forward<scalar_t>(g, in.value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                             starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
                             in.weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  check_levels(spatial_shapes, level_start_index, g.value_len);
  check_grad_output(grad_output, value, g);
  // Float atomics add in whatever order the warps reach them.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda (grad_value)");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc_dtype = accumulate_dtype(value.scalar_type());
  // Atomics accumulate in float32 for half types; rounded once at the end.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::zeros(attention_weights.sizes(), attention_weights.options());
  const Operands in =
      contiguous_operands(value, sampling_locations, attention_weights, grad_output);
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_backward<scalar_t>(g, in.value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(), in.locations.data_ptr<acc_t>(),
                              in.weights.data_ptr<acc_t>(), in.grad_output.data_ptr<scalar_t>(),
                              grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
                              grad_weights.data_ptr<acc_t>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto grad_value = acc_dtype != value.scalar_type() ? grad_value_acc.to(value.scalar_type())
                                                     : grad_value_acc;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace msda
}  // namespace dino_scale

TORCH_LIBRARY_IMPL(dino_scale, CUDA, m) {
  m.impl("ms_deform_attn_forward", &dino_scale::msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &dino_scale::msda::backward_cuda);
}
