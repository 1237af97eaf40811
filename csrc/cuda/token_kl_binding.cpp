// CUDA implementations of score_ext::token_kl_{fwd,bwd}; schemas live in cpu/token_kl.cpp.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/common_binding.h"
#include "cuda/token_kl.h"

namespace {

at::Tensor token_kl_fwd_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t est) {
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes(), "token_kl: shape mismatch");
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto b_ = ref_logprobs.to(logprobs.scalar_type()).contiguous();
  auto a_ = logprobs.contiguous();
  auto out = at::empty(a_.sizes(), a_.options().dtype(at::kFloat));
  score::check_cuda(score::launch_token_kl_fwd(a_.data_ptr(), b_.data_ptr(), out.data_ptr<float>(), a_.numel(),
                                               score::dtype_code(a_), static_cast<int>(est),
                                               score::current_stream(a_)),
                    "token_kl_fwd");
  return out;
}

at::Tensor token_kl_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& logprobs,
                             const at::Tensor& ref_logprobs, int64_t est) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto g = grad_out.to(at::kFloat).contiguous();
  auto a_ = logprobs.contiguous();
  auto b_ = ref_logprobs.to(logprobs.scalar_type()).contiguous();
  auto grad = at::empty_like(a_);
  score::check_cuda(score::launch_token_kl_bwd(g.data_ptr<float>(), a_.data_ptr(), b_.data_ptr(), grad.data_ptr(),
                                               a_.numel(), score::dtype_code(a_), static_cast<int>(est),
                                               score::current_stream(a_)),
                    "token_kl_bwd");
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(score_ext, CUDA, m) {
  m.impl("token_kl_fwd", &token_kl_fwd_cuda);
  m.impl("token_kl_bwd", &token_kl_bwd_cuda);
}
