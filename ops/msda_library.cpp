// Schema of the op in the PyTorch dispatcher. Device kernels register in msda_cpu.cpp and
// msda_cuda.cu; autograd and fake (meta) kernels are registered from Python
// (dino_scale/ops/native.py) through torch.library.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(dino_scale, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

// Importing the extension module loads the library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "dino_scale native multi-scale deformable attention (torch.ops.dino_scale)";
}
