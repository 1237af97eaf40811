// policy_loss: schema definitions and CPU kernels. One pass over the tokens per row (rows run in
// parallel under at::parallel_for) writes dl/dlogprob and the row's partial sums; a serial pass
// over rows (B of them) turns those into the loss, the stats and the row weights. Per-token math:
// common/pg_math.h (+ common/kl_math.h), the same functions the CUDA kernels call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/pg_math.h"

namespace {

using score::PGParams;

PGParams make_params(const c10::ArrayRef<double>& coef, int64_t est, double clip_lo, double clip_hi, int64_t agg,
                     bool has_old, bool has_ref) {
  TORCH_CHECK(coef.size() >= 1 && coef.size() <= (size_t)score::PG_MAX_TURNS, "policy_loss: 1..8 turns");
  PGParams p{};
  for (size_t k = 0; k < coef.size(); ++k) p.kl_coef[k] = coef[k];
  p.num_turns = (int)coef.size();
  p.estimator = (int)est;
  p.agg = (int)agg;
  p.has_old = has_old;
  p.has_ref = has_ref;
  p.has_clip = clip_lo >= 0;
  p.clip_lo = clip_lo;
  p.clip_hi = clip_hi;
  return p;
}

// Per-row partials: [pg, klterm, n, clipped, ratio, then per turn (n_k, kl_k, adv_k)].
constexpr int R_PG = 0, R_KLT = 1, R_N = 2, R_CLIP = 3, R_RATIO = 4, R_TURN = 5;

template <typename T>
void rows_pass(const T* lp, const T* adv, const int64_t* ids, const T* old, const T* ref, const int64_t* cu,
               int64_t B, int64_t T_, int64_t N, const PGParams& p, T* dl, double* part, int nv) {
  const int K = p.num_turns;
  // rows per task: about 16k tokens, so small batches do not pay for thread start-up
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, N / std::max<int64_t>(1, B)));
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      double* r = part + b * nv;
      const int64_t s = cu ? cu[b] : b * T_;
      const int64_t e = cu ? cu[b + 1] : s + T_;
      for (int64_t t = s; t < e; ++t) {
        const int64_t id = ids[t];
        if (id < 0 || id >= K) { dl[t] = T(0); continue; }
        const auto o = score::pg_token<T>(lp[t], old ? old[t] : T(0), ref ? ref[t] : T(0), adv[t],
                                          T(p.kl_coef[id]), p);
        dl[t] = o.dl;
        r[R_PG] += o.pg;
        r[R_KLT] += T(p.kl_coef[id]) * o.kl;
        r[R_N] += 1;
        r[R_CLIP] += o.clipped;
        r[R_RATIO] += o.ratio;
        r[R_TURN + 3 * id] += 1;
        r[R_TURN + 3 * id + 1] += o.kl;
        r[R_TURN + 3 * id + 2] += adv[t];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& advantages, const at::Tensor& turn_ids,
    const c10::optional<at::Tensor>& old_logprobs, const c10::optional<at::Tensor>& ref_logprobs,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& global_count,
    c10::ArrayRef<double> kl_coef, int64_t est, double clip_lo, double clip_hi, int64_t agg, double global_count_f) {
  const bool dbl = logprobs.scalar_type() == at::kDouble;
  const auto ct = dbl ? at::kDouble : at::kFloat;
  const PGParams p = make_params(kl_coef, est, clip_lo, clip_hi, agg, old_logprobs.has_value(),
                                 ref_logprobs.has_value());
  const int K = p.num_turns;
  auto lp = logprobs.to(ct).contiguous();
  auto adv = advantages.to(ct).contiguous();
  auto ids = turn_ids.to(at::kLong).contiguous();
  at::Tensor old, ref, cu;
  if (old_logprobs) old = old_logprobs->to(ct).contiguous();
  if (ref_logprobs) ref = ref_logprobs->to(ct).contiguous();
  const int64_t N = lp.numel();
  int64_t B, T_ = 0;
  if (cu_seqlens) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    B = cu.numel() - 1;
  } else {
    TORCH_CHECK(lp.dim() == 2, "policy_loss: logprobs must be [B, T]");
    B = lp.size(0);
    T_ = lp.size(1);
  }
  const int nv = R_TURN + 3 * K;
  std::vector<double> part(std::max<int64_t>(B, 1) * nv, 0.0);
  auto dl = at::empty_like(lp);
  if (dbl)
    rows_pass<double>(lp.data_ptr<double>(), adv.data_ptr<double>(), ids.data_ptr<int64_t>(),
                      old.defined() ? old.data_ptr<double>() : nullptr, ref.defined() ? ref.data_ptr<double>() : nullptr,
                      cu.defined() ? cu.data_ptr<int64_t>() : nullptr, B, T_, N, p, dl.data_ptr<double>(),
                      part.data(), nv);
  else
    rows_pass<float>(lp.data_ptr<float>(), adv.data_ptr<float>(), ids.data_ptr<int64_t>(),
                     old.defined() ? old.data_ptr<float>() : nullptr, ref.defined() ? ref.data_ptr<float>() : nullptr,
                     cu.defined() ? cu.data_ptr<int64_t>() : nullptr, B, T_, N, p, dl.data_ptr<float>(),
                     part.data(), nv);

  // Serial finalize over rows (row order is fixed, so the result is deterministic).
  std::vector<double> tot(nv, 0.0);
  double seqs = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < nv; ++j) tot[j] += part[b * nv + j];
    seqs += part[b * nv + R_N] > 0;
  }
  double denom;
  if (global_count) denom = global_count->to(at::kDouble).item<double>();  // a CPU scalar: no device sync
  else if (global_count_f > 0) denom = global_count_f;
  else denom = std::max(1.0, agg == score::AGG_TOKEN_MEAN ? tot[R_N] : seqs);
  auto w = at::empty({B}, lp.options());
  double pg_loss = 0, kl_loss = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double wb = score::row_weight<double>((int)agg, part[b * nv + R_N], denom);
    pg_loss += wb * part[b * nv + R_PG];
    kl_loss += wb * part[b * nv + R_KLT];
    if (dbl) w.data_ptr<double>()[b] = wb; else w.data_ptr<float>()[b] = (float)wb;
  }
  auto stats = at::empty({score::ST_FIXED + 3 * K}, lp.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  const double t1 = std::max(1.0, tot[R_N]);
  double kl_all = 0;
  for (int k = 0; k < K; ++k) kl_all += tot[R_TURN + 3 * k + 1];
  st[score::ST_PG_LOSS] = (float)pg_loss;
  st[score::ST_KL_LOSS] = (float)kl_loss;
  st[score::ST_TOKENS] = (float)tot[R_N];
  st[score::ST_SEQS] = (float)seqs;
  st[score::ST_CLIP_FRAC] = (float)(tot[R_CLIP] / t1);
  st[score::ST_RATIO_MEAN] = (float)(tot[R_RATIO] / t1);
  st[score::ST_KL_MEAN] = (float)(kl_all / t1);
  for (int k = 0; k < K; ++k) {
    const double nk = tot[R_TURN + 3 * k];
    st[score::stat_turn(k, 0, K)] = (float)(tot[R_TURN + 3 * k + 1] / std::max(1.0, nk));
    st[score::stat_turn(k, 1, K)] = (float)(tot[R_TURN + 3 * k + 2] / std::max(1.0, nk));
    st[score::stat_turn(k, 2, K)] = (float)nk;
  }
  auto loss = at::scalar_tensor(pg_loss + kl_loss, lp.options());
  return {loss, stats, dl.to(logprobs.scalar_type()), w};
}

at::Tensor policy_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& dl, const at::Tensor& row_w,
                               const c10::optional<at::Tensor>& cu_seqlens) {
  const bool dbl = dl.scalar_type() == at::kDouble;
  auto d = dl.to(dbl ? at::kDouble : at::kFloat).contiguous();
  auto w = row_w.to(at::kDouble).contiguous();
  const double g = grad.to(at::kDouble).item<double>();  // grad and row_w live on the CPU here
  auto out = at::empty_like(d);
  const double* wp = w.data_ptr<double>();
  const int64_t B = w.numel();
  at::Tensor cu;
  const int64_t* cp = nullptr;
  if (cu_seqlens) { cu = cu_seqlens->to(at::kLong).contiguous(); cp = cu.data_ptr<int64_t>(); }
  const int64_t T_ = cp ? 0 : (B ? d.numel() / B : 0);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "policy_loss_bwd", [&] {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, d.numel() / std::max<int64_t>(1, B)));
    at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t s = static_cast<scalar_t>(wp[b] * g);
        const int64_t e = cp ? cp[b + 1] : (b + 1) * T_;
        for (int64_t t = cp ? cp[b] : b * T_; t < e; ++t) op[t] = dp[t] == scalar_t(0) ? scalar_t(0) : dp[t] * s;
      }
    });
  });
  return out.to(dl.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(score_ext, m) {
  m.def("policy_loss_fwd(Tensor logprobs, Tensor advantages, Tensor turn_ids, Tensor? old_logprobs, "
        "Tensor? ref_logprobs, Tensor? cu_seqlens, Tensor? global_count, float[] kl_coef, int estimator, "
        "float clip_lo, float clip_hi, int agg, float global_count_f) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("policy_loss_bwd(Tensor grad, Tensor dl, Tensor row_w, Tensor? cu_seqlens) -> Tensor");
}

TORCH_LIBRARY_IMPL(score_ext, CPU, m) {
  m.impl("policy_loss_fwd", &policy_loss_fwd_cpu);
  m.impl("policy_loss_bwd", &policy_loss_bwd_cpu);
}
