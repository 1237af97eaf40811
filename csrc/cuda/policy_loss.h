// Torch-free launchers for policy_loss (raw pointers, sizes, a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/pg_math.h"

namespace score {

struct PLArgs {
  // inputs: lp/old/ref of `dtype` (dtypes.h), adv float32 (float64 when dtype is F64),
  // ids int64 (ids64) or int32, cu [B+1] int64 or null ([B, T] layout)
  const void* lp; const void* old; const void* ref; const void* adv; const void* ids; const int64_t* cu;
  int dtype; bool ids64;
  int64_t B, T, N;
  // outputs: dl (dtype), loss (compute type: double for F64 else float), stats float32
  // [ST_FIXED + 3K], row_w [B] (compute type)
  void* dl; void* loss; float* stats; void* row_w;
  // zeroed workspace of policy_loss_work_doubles(B) doubles: per-block batch partials, then row
  // sums [3 * B]
  double* work;
  int nblocks;  // set by the launcher
  const void* gcount;  // device scalar of the compute type, or null
  double gcount_f;     // > 0: a global count given as a number
};

// Fused forward: one pass over the tokens computes every token's loss term and dl/dlp (written
// to dl), and the row and batch partial sums; a one-block finaliser makes loss, stats and row_w.
cudaError_t launch_policy_loss_fwd(const PLArgs& a, const PGParams& p, cudaStream_t stream);
// grad = dl * row_w[row] * g[0]; g, row_w in the compute type; grad, dl in `dtype`.
cudaError_t launch_policy_loss_bwd(const void* g, const void* dl, const void* row_w, const int64_t* cu, int dtype,
                                   int64_t B, int64_t T, int64_t N, void* grad, cudaStream_t stream);
size_t policy_loss_work_doubles(int64_t B);

}  // namespace score
