// Argument checks and operand preparation shared by the CPU and CUDA entry points. The
// checks guard memory safety for direct torch.ops calls; dino_scale.ops checks the same
// contract in Python first with friendlier errors (and for fake tensors, where this code
// does not run).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "msda_core.h"

namespace dino_scale {
namespace msda {

// sampling_locations and attention_weights are float32 for float32/bfloat16/float16 values
// and float64 for float64 values: the dtype the kernels accumulate in.
inline at::ScalarType accumulate_dtype(at::ScalarType value_dtype) {
  return value_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline Geometry check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got shape ",
              value.sizes());
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || vt == at::kHalf || vt == at::kBFloat16,
              "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", vt);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got shape ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "ms_deform_attn: level_start_index must be [L] with L = ", levels, ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());
  const int64_t batch = value.size(0), heads = value.size(2);
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == batch &&
                  sampling_locations.size(2) == heads && sampling_locations.size(3) == levels &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2] = [", batch,
              ", Lq, ", heads, ", ", levels, ", P, 2], got shape ", sampling_locations.sizes());
  const int64_t queries = sampling_locations.size(1), points = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == batch &&
                  attention_weights.size(1) == queries && attention_weights.size(2) == heads &&
                  attention_weights.size(3) == levels && attention_weights.size(4) == points,
              "ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = [", batch, ", ",
              queries, ", ", heads, ", ", levels, ", ", points, "], got shape ",
              attention_weights.sizes());
  const auto acc = accumulate_dtype(vt);
  TORCH_CHECK(sampling_locations.scalar_type() == acc, "ms_deform_attn: sampling_locations must be ",
              acc, " for ", vt, " value, got ", sampling_locations.scalar_type());
  TORCH_CHECK(attention_weights.scalar_type() == acc, "ms_deform_attn: attention_weights must be ",
              acc, " for ", vt, " value, got ", attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device, "ms_deform_attn: spatial_shapes is on ",
              spatial_shapes.device(), " but value is on ", device);
  TORCH_CHECK(level_start_index.device() == device, "ms_deform_attn: level_start_index is on ",
              level_start_index.device(), " but value is on ", device);
  TORCH_CHECK(sampling_locations.device() == device, "ms_deform_attn: sampling_locations is on ",
              sampling_locations.device(), " but value is on ", device);
  TORCH_CHECK(attention_weights.device() == device, "ms_deform_attn: attention_weights is on ",
              attention_weights.device(), " but value is on ", device);
  return Geometry{batch, value.size(1), heads, value.size(3), levels, points, queries};
}

// Level geometry, read on the host.
struct Level {
  int64_t height, width, start;
};

// Reads spatial_shapes and level_start_index and checks them against value's S: sizes
// non-negative, fewer than 2^31 pixels per level (the kernels index pixels with int32),
// starts the running sums of the sizes, sizes summing to S. Both kernels index value with
// them, so a wrong one would read and write out of bounds. For CUDA tensors this is a
// small copy to the host, which waits for the stream.
inline std::vector<Level> check_levels(const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, int64_t value_len) {
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  std::vector<Level> levels(shapes.size(0));
  int64_t expected_start = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = Level{hw[2 * l], hw[2 * l + 1], st[l]};
    TORCH_CHECK(levels[l].height >= 0 && levels[l].width >= 0,
                "ms_deform_attn: spatial_shapes has a negative size at level ", l);
    TORCH_CHECK(levels[l].height < (int64_t(1) << 31) && levels[l].width < (int64_t(1) << 31) &&
                    levels[l].height * levels[l].width < (int64_t(1) << 31),
                "ms_deform_attn: spatial_shapes level ", l, " has 2^31 pixels or more");
    TORCH_CHECK(levels[l].start == expected_start, "ms_deform_attn: level_start_index[", l,
                "] is ", levels[l].start, " but the spatial_shapes before it sum to ",
                expected_start);
    expected_start += levels[l].height * levels[l].width;
  }
  TORCH_CHECK(expected_start == value_len, "ms_deform_attn: spatial_shapes sum to ",
              expected_start, " pixels but value has S = ", value_len);
  return levels;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                              const Geometry& g) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == g.batch &&
                  grad_output.size(1) == g.queries && grad_output.size(2) == g.heads * g.channels,
              "ms_deform_attn: grad_output must be [N, Lq, M * D] = [", g.batch, ", ", g.queries,
              ", ", g.heads * g.channels, "], got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must have value's dtype ", value.scalar_type(), ", got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
}

// The tensors the kernels index with raw pointers, made contiguous (no copy when they are).
struct Operands {
  at::Tensor value, locations, weights, grad_output;
};

inline Operands contiguous_operands(const at::Tensor& value,
                                    const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights,
                                    const at::Tensor& grad_output = at::Tensor()) {
  return {value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous(),
          grad_output.defined() ? grad_output.contiguous() : grad_output};
}

}  // namespace msda
}  // namespace dino_scale
