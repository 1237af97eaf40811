// CUDA implementations of score_ext::turn_advantages / token_advantages; schemas live in
// cpu/advantages.cpp.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/advantages.h"
#include "cuda/common_binding.h"

namespace {

at::Tensor turn_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t est,
                                double alpha, bool std_norm, double eps) {
  TORCH_CHECK(rewards.dim() == 2 && group_ids.dim() == 1 && group_ids.size(0) == rewards.size(0),
              "turn_advantages: shape mismatch");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const bool f64 = rewards.scalar_type() == at::kDouble;
  auto r = rewards.to(f64 ? at::kDouble : at::kFloat).contiguous();
  auto ids = group_ids.to(at::kLong).contiguous();
  const int64_t B = r.size(0), K = r.size(1);
  auto out = at::empty({B, K}, r.options().dtype(at::kFloat));
  auto scratch = at::empty({(int64_t)score::turn_advantages_scratch_bytes(B, K)}, r.options().dtype(at::kByte));
  score::check_cuda(score::launch_turn_advantages(r.data_ptr(), f64, ids.data_ptr<int64_t>(), B, K, (int)est, alpha,
                                                  std_norm, eps, out.data_ptr<float>(), scratch.data_ptr(),
                                                  score::current_stream(r)),
                    "turn_advantages");
  return out;
}

at::Tensor token_advantages_cuda(const at::Tensor& turn_values, const at::Tensor& turn_ids,
                                 const c10::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(turn_values.device());
  const int64_t B = turn_values.size(0), K = turn_values.size(1);
  auto v = turn_values.to(at::kFloat).contiguous();
  const bool ids64 = turn_ids.scalar_type() == at::kLong;
  auto ids = turn_ids.to(ids64 ? at::kLong : at::kInt).contiguous();
  at::Tensor cu;
  int64_t T = 0;
  if (cu_seqlens) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.numel() == B + 1, "token_advantages: cu_seqlens must have B+1 entries");
  } else {
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B, "token_advantages: B mismatch");
    T = ids.size(1);
  }
  auto out = at::empty(ids.sizes(), v.options());
  score::check_cuda(score::launch_token_advantages(v.data_ptr<float>(), B, K, ids.data_ptr(), ids64,
                                                   cu.defined() ? cu.data_ptr<int64_t>() : nullptr, T, ids.numel(),
                                                   out.data_ptr<float>(), score::current_stream(v)),
                    "token_advantages");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(score_ext, CUDA, m) {
  m.impl("turn_advantages", &turn_advantages_cuda);
  m.impl("token_advantages", &token_advantages_cuda);
}
