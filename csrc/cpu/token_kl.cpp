// token_kl: schema definitions and the CPU kernels (OpenMP via at::parallel_for), using the
// shared math in common/kl_math.h. CUDA implementations register in cuda/token_kl_binding.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "common/kl_math.h"

namespace {

// float64 inputs keep float64 math (for reference checks); all other dtypes compute in fp32,
// exactly as the GPU kernels do.
at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// The estimator is a template argument so that each inner loop is branch-free and vectorisable
// (k3's expm1 included, see common/expm1.h); the range functions are compiled per SIMD target.
template <typename T, int EST>
SCORE_SIMD_CLONES void fwd_range(const T* a, const T* b, float* o, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) o[i] = static_cast<float>(score::kl_value<T>(a[i] - b[i], EST));
}

template <typename T, int EST>
SCORE_SIMD_CLONES void bwd_range(const float* g, const T* a, const T* b, T* o, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) o[i] = static_cast<T>(g[i]) * score::kl_grad<T>(a[i] - b[i], EST);
}

template <typename T, int EST>
void fwd_loop_est(const T* a, const T* b, float* o, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) { fwd_range<T, EST>(a, b, o, lo, hi); });
}

template <typename T, int EST>
void bwd_loop_est(const float* g, const T* a, const T* b, T* o, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) { bwd_range<T, EST>(g, a, b, o, lo, hi); });
}

template <typename T>
void fwd_loop(const T* a, const T* b, float* o, int64_t n, int est) {
  switch (est) {
    case score::KL_K1: return fwd_loop_est<T, score::KL_K1>(a, b, o, n);
    case score::KL_K2: return fwd_loop_est<T, score::KL_K2>(a, b, o, n);
    case score::KL_K3: return fwd_loop_est<T, score::KL_K3>(a, b, o, n);
    default: return fwd_loop_est<T, score::KL_ABS>(a, b, o, n);
  }
}

template <typename T>
void bwd_loop(const float* g, const T* a, const T* b, T* o, int64_t n, int est) {
  switch (est) {
    case score::KL_K1: return bwd_loop_est<T, score::KL_K1>(g, a, b, o, n);
    case score::KL_K2: return bwd_loop_est<T, score::KL_K2>(g, a, b, o, n);
    case score::KL_K3: return bwd_loop_est<T, score::KL_K3>(g, a, b, o, n);
    default: return bwd_loop_est<T, score::KL_ABS>(g, a, b, o, n);
  }
}

at::Tensor token_kl_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t est) {
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes(), "token_kl: shape mismatch");
  const auto ct = compute_type(logprobs, ref_logprobs);
  auto a = logprobs.to(ct).contiguous();
  auto b = ref_logprobs.to(ct).contiguous();
  auto out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  if (ct == at::kDouble)
    fwd_loop<double>(a.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<float>(), a.numel(), est);
  else
    fwd_loop<float>(a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), a.numel(), est);
  return out;
}

at::Tensor token_kl_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& logprobs,
                            const at::Tensor& ref_logprobs, int64_t est) {
  const auto ct = compute_type(logprobs, ref_logprobs);
  auto g = grad_out.to(at::kFloat).contiguous();
  auto a = logprobs.to(ct).contiguous();
  auto b = ref_logprobs.to(ct).contiguous();
  auto grad = at::empty_like(a);
  if (ct == at::kDouble)
    bwd_loop<double>(g.data_ptr<float>(), a.data_ptr<double>(), b.data_ptr<double>(),
                     grad.data_ptr<double>(), a.numel(), est);
  else
    bwd_loop<float>(g.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                    grad.data_ptr<float>(), a.numel(), est);
  return grad.to(logprobs.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(score_ext, m) {
  m.def("token_kl_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("token_kl_bwd(Tensor grad_out, Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
}

TORCH_LIBRARY_IMPL(score_ext, CPU, m) {
  m.impl("token_kl_fwd", &token_kl_fwd_cpu);
  m.impl("token_kl_bwd", &token_kl_bwd_cpu);
}
