// policy_loss: per-token math and the aggregation weights, shared by the CPU and CUDA builds.
#pragma once
#include "common/kl_math.h"
#include "common/macros.h"

namespace score {

// Order matches score_kernels.policy_loss.AGGS.
enum PGAgg : int { AGG_TOKEN_MEAN = 0, AGG_SEQ_MEAN_TOKEN_SUM = 1, AGG_SEQ_MEAN_TOKEN_MEAN = 2 };
constexpr int PG_MAX_TURNS = 8;

struct PGParams {
  double kl_coef[PG_MAX_TURNS];  // double: float64 runs keep the exact coefficients
  int num_turns;
  int estimator;      // KLEstimator
  int agg;            // PGAgg
  bool has_old, has_ref, has_clip;
  double clip_lo, clip_hi;  // ratio is clipped to [1 - clip_lo, 1 + clip_hi]
};

// One policy token: its loss term l = pg + coef * kl and dl/dlogprob. `old`/`ref` are ignored
// when the params say they are absent (ratio = 1, no KL).
template <typename T>
struct PGToken {
  T loss, pg, kl, dl, ratio;
  bool clipped;
};

template <typename T>
SCORE_HD PGToken<T> pg_token(T lp, T old, T ref, T adv, T coef, const PGParams& p) {
  PGToken<T> o;
  // Without old: ratio = exp(lp - lp) as in the reference's exp(lp - lp.detach()): 1, but NaN for a
  // NaN / inf lp, so a bad log-prob reaches the loss and gradient instead of vanishing.
  o.ratio = p.has_old ? exp(lp - old) : exp(lp - lp);
  const T pg1 = -adv * o.ratio;
  o.pg = pg1;
  o.clipped = false;
  T dpg = pg1;  // d(-adv * exp(lp - old)) / dlp
  if (p.has_clip) {
    T rc = o.ratio;
    const T lo = T(1.0 - p.clip_lo), hi = T(1.0 + p.clip_hi);
    rc = rc < lo ? lo : (rc > hi ? hi : rc);
    const T pg2 = -adv * rc;
    // PPO takes the max; the clipped branch is constant in lp, so its gradient is 0.
    if (pg2 > pg1) { o.clipped = true; o.pg = pg2; dpg = T(0); }
  }
  o.kl = T(0);
  T dkl = T(0);
  if (p.has_ref) {
    o.kl = kl_value<T>(lp - ref, p.estimator);
    dkl = kl_grad<T>(lp - ref, p.estimator);
  }
  o.loss = o.pg + coef * o.kl;
  o.dl = dpg + coef * dkl;
  return o;
}

// Weight of row b's token-loss sum in the final loss, so loss = sum_b w_b * rowsum_b and
// dloss/dlp_t = w_b * dl_t. n_b: the row's policy tokens; denom: total policy tokens
// (token-mean) or rows with at least one policy token (seq modes), or the caller's global count.
template <typename T>
SCORE_HD T row_weight(int agg, T n_b, T denom) {
  if (agg == AGG_TOKEN_MEAN) return T(1) / denom;
  if (n_b <= T(0)) return T(0);
  return agg == AGG_SEQ_MEAN_TOKEN_SUM ? T(1) / denom : T(1) / (n_b * denom);
}

// Layout of the stats vector (float32) every backend returns; per-turn blocks follow.
enum PGStat : int {
  ST_PG_LOSS = 0, ST_KL_LOSS, ST_TOKENS, ST_SEQS, ST_CLIP_FRAC, ST_RATIO_MEAN, ST_KL_MEAN, ST_FIXED
};
// Per-turn entries: kl mean, advantage mean, token count.
SCORE_HD int stat_turn(int k, int which, int K) { return ST_FIXED + which * K + k; }

}  // namespace score
