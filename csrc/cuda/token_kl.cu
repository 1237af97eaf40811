// token_kl CUDA kernels: a grid-stride elementwise pass, math shared with the CPU build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/kl_math.h"
#include "cuda/convert.cuh"
#include "cuda/dtypes.h"
#include "cuda/token_kl.h"

namespace score {
namespace {

template <typename T>
__global__ void token_kl_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                                    int64_t n, int est) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = kl_value<float>(to_f(a[i]) - to_f(b[i]), est);
}

template <>
__global__ void token_kl_fwd_kernel<double>(const double* __restrict__ a, const double* __restrict__ b,
                                            float* __restrict__ out, int64_t n, int est) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<float>(kl_value<double>(a[i] - b[i], est));
}

template <typename T>
__global__ void token_kl_bwd_kernel(const float* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                                    T* __restrict__ grad, int64_t n, int est) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    grad[i] = from_f<T>(g[i] * kl_grad<float>(to_f(a[i]) - to_f(b[i]), est));
}

template <>
__global__ void token_kl_bwd_kernel<double>(const float* __restrict__ g, const double* __restrict__ a,
                                            const double* __restrict__ b, double* __restrict__ grad, int64_t n,
                                            int est) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    grad[i] = g[i] * kl_grad<double>(a[i] - b[i], est);
}

inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride covers the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace

cudaError_t launch_token_kl_fwd(const void* a, const void* b, float* out, int64_t n, int dtype, int est,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned grid = grid_for(n, threads);
  switch (dtype) {
    case DT_F32: token_kl_fwd_kernel<float><<<grid, threads, 0, stream>>>((const float*)a, (const float*)b, out, n, est); break;
    case DT_F16: token_kl_fwd_kernel<__half><<<grid, threads, 0, stream>>>((const __half*)a, (const __half*)b, out, n, est); break;
    case DT_BF16: token_kl_fwd_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>((const __nv_bfloat16*)a, (const __nv_bfloat16*)b, out, n, est); break;
    case DT_F64: token_kl_fwd_kernel<double><<<grid, threads, 0, stream>>>((const double*)a, (const double*)b, out, n, est); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_token_kl_bwd(const float* g, const void* a, const void* b, void* grad, int64_t n, int dtype,
                                int est, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned grid = grid_for(n, threads);
  switch (dtype) {
    case DT_F32: token_kl_bwd_kernel<float><<<grid, threads, 0, stream>>>(g, (const float*)a, (const float*)b, (float*)grad, n, est); break;
    case DT_F16: token_kl_bwd_kernel<__half><<<grid, threads, 0, stream>>>(g, (const __half*)a, (const __half*)b, (__half*)grad, n, est); break;
    case DT_BF16: token_kl_bwd_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(g, (const __nv_bfloat16*)a, (const __nv_bfloat16*)b, (__nv_bfloat16*)grad, n, est); break;
    case DT_F64: token_kl_bwd_kernel<double><<<grid, threads, 0, stream>>>(g, (const double*)a, (const double*)b, (double*)grad, n, est); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace score
