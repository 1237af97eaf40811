// Torch-free launchers for token_kl (raw pointers, sizes, a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace score {
// a, b: logprobs and ref_logprobs of dtype `dtype` (see dtypes.h), contiguous, n elements.
cudaError_t launch_token_kl_fwd(const void* a, const void* b, float* out, int64_t n, int dtype, int est,
                                cudaStream_t stream);
// grad (same dtype as a) = g * dkl/da.
cudaError_t launch_token_kl_bwd(const float* g, const void* a, const void* b, void* grad, int64_t n,
                                int dtype, int est, cudaStream_t stream);
}  // namespace score
