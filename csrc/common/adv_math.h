// Turn-level advantages: per-sample math shared by the CPU (g++) and CUDA (nvcc) builds.
// The group reductions (sum, count, sum of squared deviations) differ per backend; what is done
// with them is written once here.
#pragma once
#include "common/macros.h"

namespace score {

// Order matches score_kernels.advantages.ESTIMATORS.
enum AdvEstimator : int { ADV_RLOO = 0, ADV_GRPO = 1, ADV_REINFORCE = 2, ADV_NONE = 3 };

// SCoRe Stage II bonus: r'_k = r_k + alpha * (r_k - r_{k-1}) for k >= 1; r'_0 = r_0.
template <typename T>
SCORE_HD T shaped_reward(T r_k, T r_prev, int k, T alpha) {
  return k == 0 ? r_k : r_k + alpha * (r_k - r_prev);
}

// A for one sample and turn, given its group's sum of r', member count n and sum of squared
// deviations m2 (only read when std_norm). For "reinforce" the group is the whole batch.
template <typename T>
SCORE_HD T advantage_value(T r, T sum, T n, T m2, int est, bool std_norm, T eps) {
  if (est == ADV_NONE) return r;
  if (est == ADV_RLOO) return n > T(1) ? r - (sum - r) / (n - T(1)) : r;  // a lone member has baseline 0
  T a = r - sum / n;
  if (std_norm) {
    const T sd = n > T(1) ? sqrt(m2 / (n - T(1))) : T(1);  // unbiased, like torch.std
    a = a / (sd + eps);
  }
  return a;
}

// 64-bit mix (splitmix64 finaliser) for the CUDA group hash table.
SCORE_HD unsigned long long mix64(unsigned long long x) {
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27; x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace score
