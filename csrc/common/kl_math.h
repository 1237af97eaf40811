#pragma once
#include "common/macros.h"
#include "common/expm1.h"

namespace score {

// Order matches score_kernels.token_kl.ESTIMATORS.
enum KLEstimator : int { KL_K1 = 0, KL_K2 = 1, KL_K3 = 2, KL_ABS = 3 };

// delta = logprob - ref_logprob. k3 uses expm1 so that tiny deltas do not cancel to 0.
template <typename T>
SCORE_HD T kl_value(T delta, int est) {
  switch (est) {
    case KL_K1: return delta;
    case KL_K2: return T(0.5) * delta * delta;
    case KL_K3: return expm1_<T>(-delta) + delta;
    default:    return delta < T(0) ? -delta : delta;
  }
}

// d kl / d logprob.
template <typename T>
SCORE_HD T kl_grad(T delta, int est) {
  switch (est) {
    case KL_K1: return T(1);
    case KL_K2: return delta;
    case KL_K3: return -expm1_<T>(-delta);
    default:    return delta > T(0) ? T(1) : (delta < T(0) ? T(-1) : T(0));
  }
}

}  // namespace score
