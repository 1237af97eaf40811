// Helpers for the CUDA torch bindings (compiled only in CUDA builds).
#pragma once
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dtypes.h"

namespace score {
inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT_F32;
    case at::kHalf: return DT_F16;
    case at::kBFloat16: return DT_BF16;
    case at::kDouble: return DT_F64;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}
}  // namespace score
