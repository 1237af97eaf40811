// turn_advantages / token_advantages: schema definitions and CPU kernels. Group ids are compacted
// with a hash map (one serial O(B) pass: B is the number of samples, small), the per-sample math
// (common/adv_math.h) runs under at::parallel_for. CUDA versions: cuda/advantages_binding.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

#include "common/adv_math.h"

namespace {

// Batches of samples are small (B ~ 1k): below this, threads cost more than they save.
constexpr int64_t kSampleGrain = 1 << 15;

at::Tensor turn_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_ids, int64_t est,
                               double alpha, bool std_norm, double eps) {
  TORCH_CHECK(rewards.dim() == 2 && group_ids.dim() == 1 && group_ids.size(0) == rewards.size(0),
              "turn_advantages: shape mismatch");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  auto r = rewards.to(at::kDouble).contiguous();
  auto ids = group_ids.to(at::kLong).contiguous();
  const double* rp = r.data_ptr<double>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  auto out = at::empty({B, K}, rewards.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();

  // Shaped rewards, once.
  std::vector<double> rs(B * K);
  at::parallel_for(0, B, kSampleGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t k = 0; k < K; ++k) rs[i * K + k] = score::shaped_reward<double>(rp[i * K + k], k ? rp[i * K + k - 1] : 0.0, (int)k, alpha);
  });

  std::vector<int64_t> g(B, 0);
  int64_t G = 1;
  if (est == score::ADV_RLOO || est == score::ADV_GRPO) {
    std::unordered_map<int64_t, int64_t> slot;
    slot.reserve(B * 2);
    for (int64_t i = 0; i < B; ++i) g[i] = slot.emplace(ip[i], (int64_t)slot.size()).first->second;
    G = (int64_t)slot.size();
  }
  std::vector<double> n(G, 0.0), sum(G * K, 0.0), m2(G * K, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    n[g[i]] += 1.0;
    for (int64_t k = 0; k < K; ++k) sum[g[i] * K + k] += rs[i * K + k];
  }
  if (std_norm)  // two-pass variance: sum of squared deviations from the group mean
    for (int64_t i = 0; i < B; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const double d = rs[i * K + k] - sum[g[i] * K + k] / n[g[i]];
        m2[g[i] * K + k] += d * d;
      }
  at::parallel_for(0, B, kSampleGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = g[i] * K + k;
        op[i * K + k] = static_cast<float>(
            score::advantage_value<double>(rs[i * K + k], sum[s], n[g[i]], m2[s], (int)est, std_norm, eps));
      }
  });
  return out;
}

at::Tensor token_advantages_cpu(const at::Tensor& turn_values, const at::Tensor& turn_ids,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  const int64_t B = turn_values.size(0), K = turn_values.size(1);
  auto v = turn_values.to(at::kFloat).contiguous();
  auto ids = turn_ids.to(at::kLong).contiguous();
  auto out = at::empty(ids.sizes(), turn_values.options().dtype(at::kFloat));
  const float* vp = v.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::Tensor cu;
  const int64_t* cp = nullptr;
  const int64_t T = cu_seqlens.has_value() ? 0 : ids.size(1);
  if (cu_seqlens.has_value()) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.numel() == B + 1, "token_advantages: cu_seqlens must have B+1 entries");
    cp = cu.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(ids.size(0) == B, "token_advantages: B mismatch");
  }
  const int64_t N = ids.numel();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cp ? N / std::max<int64_t>(1, B) : T));
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t s = cp ? std::max<int64_t>(0, cp[b]) : b * T;
      const int64_t e = cp ? std::min<int64_t>(N, cp[b + 1]) : s + T;
      for (int64_t t = s; t < e; ++t) {
        const int64_t id = ip[t];
        op[t] = (id >= 0 && id < K) ? vp[b * K + id] : 0.0f;
      }
    }
  });
  if (cp) {  // tokens outside every sequence (only with malformed cu_seqlens) stay defined
    const int64_t s0 = std::min<int64_t>(N, std::max<int64_t>(0, cp[0])), e0 = std::max<int64_t>(0, cp[B]);
    for (int64_t t = 0; t < s0; ++t) op[t] = 0.0f;
    for (int64_t t = e0; t < N; ++t) op[t] = 0.0f;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(score_ext, m) {
  m.def("turn_advantages(Tensor rewards, Tensor group_ids, int estimator, float shaping_alpha, bool std_normalize, "
        "float eps) -> Tensor");
  m.def("token_advantages(Tensor turn_values, Tensor turn_ids, Tensor? cu_seqlens) -> Tensor");
}

TORCH_LIBRARY_IMPL(score_ext, CPU, m) {
  m.impl("turn_advantages", &turn_advantages_cpu);
  m.impl("token_advantages", &token_advantages_cpu);
}
