// The CUDA kernels of ops/msda_cuda_kernels.cuh run on the cuda_emu CPU emulator, behind a C
// interface for ctypes (tests/emulated_cuda.py): raw pointers to CPU memory, errors as text.
#include "cuda_emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::cuda_emu::launch(kernel, grid, block, shared_bytes, stream)
#include "msda_cuda_kernels.cuh"

namespace {

using dino_scale::msda::acc_type;
using dino_scale::msda::Geometry;

// Codes of the value dtype, as tests/emulated_cuda.py passes them.
enum Dtype { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Calls fn with a value of the dtype's C++ type, like AT_DISPATCH; returns 0, or 1 with the
// error's text in error.
template <typename Fn>
int dispatch(int dtype, char* error, int error_len, Fn&& fn) {
  try {
    switch (dtype) {
      case kFloat32: fn(float{}); break;
      case kFloat64: fn(double{}); break;
      case kFloat16: fn(c10::Half{}); break;
      case kBFloat16: fn(c10::BFloat16{}); break;
      default: throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<size_t>(error_len), "%s", e.what());
    return 1;
  }
}

// [N, S, M, D, L, P, Lq], the order of the Geometry fields.
Geometry to_geometry(const int64_t* g) { return Geometry{g[0], g[1], g[2], g[3], g[4], g[5], g[6]}; }

}  // namespace

extern "C" int msda_emu_forward(int dtype, const int64_t* geometry, const void* value,
                                const int64_t* shapes, const int64_t* starts,
                                const void* locations, const void* weights, void* out,
                                char* error, int error_len) {
  return dispatch(dtype, error, error_len, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dino_scale::msda::launch_forward<scalar_t>(
        to_geometry(geometry), static_cast<const scalar_t*>(value), shapes, starts,
        static_cast<const acc_t*>(locations), static_cast<const acc_t*>(weights),
        static_cast<scalar_t*>(out), nullptr);
  });
}

extern "C" int msda_emu_backward(int dtype, const int64_t* geometry, const void* value,
                                 const int64_t* shapes, const int64_t* starts,
                                 const void* locations, const void* weights,
                                 const void* grad_out, void* grad_value, void* grad_locations,
                                 void* grad_weights, char* error, int error_len) {
  return dispatch(dtype, error, error_len, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dino_scale::msda::launch_backward<scalar_t>(
        to_geometry(geometry), static_cast<const scalar_t*>(value), shapes, starts,
        static_cast<const acc_t*>(locations), static_cast<const acc_t*>(weights),
        static_cast<const scalar_t*>(grad_out), static_cast<acc_t*>(grad_value),
        static_cast<acc_t*>(grad_locations), static_cast<acc_t*>(grad_weights), nullptr);
  });
}
