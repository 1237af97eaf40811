// CUDA implementations of score_ext::policy_loss_{fwd,bwd}; schemas live in cpu/policy_loss.cpp.
// Everything stays on the device: no host sync (the global count, if a tensor, is read by the
// finaliser kernel).
#include <c10/cuda/CUDAGuard.h>

#include "cuda/common_binding.h"
#include "cuda/policy_loss.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& advantages, const at::Tensor& turn_ids,
    const c10::optional<at::Tensor>& old_logprobs, const c10::optional<at::Tensor>& ref_logprobs,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& global_count,
    c10::ArrayRef<double> kl_coef, int64_t est, double clip_lo, double clip_hi, int64_t agg, double global_count_f) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  TORCH_CHECK(kl_coef.size() >= 1 && kl_coef.size() <= (size_t)score::PG_MAX_TURNS, "policy_loss: 1..8 turns");
  const auto dt = logprobs.scalar_type();
  const bool dbl = dt == at::kDouble;
  const auto ct = dbl ? at::kDouble : at::kFloat;
  auto lp = logprobs.contiguous();
  auto adv = advantages.to(ct).contiguous();
  const bool ids64 = turn_ids.scalar_type() == at::kLong;
  auto ids = turn_ids.to(ids64 ? at::kLong : at::kInt).contiguous();
  at::Tensor old, ref, cu, gc;
  if (old_logprobs) old = old_logprobs->to(dt).contiguous();
  if (ref_logprobs) ref = ref_logprobs->to(dt).contiguous();
  if (global_count) gc = global_count->to(lp.device(), ct).contiguous();
  int64_t B, T = 0;
  if (cu_seqlens) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    B = cu.numel() - 1;
  } else {
    TORCH_CHECK(lp.dim() == 2, "policy_loss: logprobs must be [B, T]");
    B = lp.size(0);
    T = lp.size(1);
  }
  score::PGParams p{};
  for (size_t k = 0; k < kl_coef.size(); ++k) p.kl_coef[k] = kl_coef[k];
  p.num_turns = (int)kl_coef.size();
  p.estimator = (int)est;
  p.agg = (int)agg;
  p.has_old = old.defined();
  p.has_ref = ref.defined();
  p.has_clip = clip_lo >= 0;
  p.clip_lo = clip_lo;
  p.clip_hi = clip_hi;

  auto opts = lp.options();
  auto dl = at::empty_like(lp);
  auto loss = at::empty({}, opts.dtype(ct));
  auto stats = at::empty({score::ST_FIXED + 3 * p.num_turns}, opts.dtype(at::kFloat));
  auto w = at::empty({B}, opts.dtype(ct));
  auto work = at::zeros({(int64_t)score::policy_loss_work_doubles(B)}, opts.dtype(at::kDouble));
  score::PLArgs a{};
  a.lp = lp.data_ptr();
  a.old = old.defined() ? old.data_ptr() : nullptr;
  a.ref = ref.defined() ? ref.data_ptr() : nullptr;
  a.adv = adv.data_ptr();
  a.ids = ids.data_ptr();
  a.cu = cu.defined() ? cu.data_ptr<int64_t>() : nullptr;
  a.dtype = score::dtype_code(lp);
  a.ids64 = ids64;
  a.B = B; a.T = T; a.N = lp.numel();
  a.dl = dl.data_ptr(); a.loss = loss.data_ptr(); a.stats = stats.data_ptr<float>(); a.row_w = w.data_ptr();
  a.work = work.data_ptr<double>();
  a.gcount = gc.defined() ? gc.data_ptr() : nullptr;
  a.gcount_f = global_count_f;
  score::check_cuda(score::launch_policy_loss_fwd(a, p, score::current_stream(lp)), "policy_loss_fwd");
  return {loss, stats, dl, w};
}

at::Tensor policy_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& dl, const at::Tensor& row_w,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(dl.device());
  const bool dbl = dl.scalar_type() == at::kDouble;
  const auto ct = dbl ? at::kDouble : at::kFloat;
  auto g = grad.to(ct).contiguous();
  auto w = row_w.to(ct).contiguous();
  auto d = dl.contiguous();
  at::Tensor cu;
  if (cu_seqlens) cu = cu_seqlens->to(at::kLong).contiguous();
  const int64_t B = w.numel();
  const int64_t T = cu.defined() ? 0 : (d.dim() == 2 ? d.size(1) : 0);
  auto out = at::empty_like(d);
  score::check_cuda(score::launch_policy_loss_bwd(g.data_ptr(), d.data_ptr(), w.data_ptr(),
                                                  cu.defined() ? cu.data_ptr<int64_t>() : nullptr,
                                                  score::dtype_code(d), B, T, d.numel(), out.data_ptr(),
                                                  score::current_stream(d)),
                    "policy_loss_bwd");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(score_ext, CUDA, m) {
  m.impl("policy_loss_fwd", &policy_loss_fwd_cuda);
  m.impl("policy_loss_bwd", &policy_loss_bwd_cuda);
}
