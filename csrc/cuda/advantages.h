// Torch-free launchers for turn_advantages / token_advantages (raw pointers, sizes, a stream).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace score {
// Bytes of scratch launch_turn_advantages needs (a hash table of group ids plus group sums).
size_t turn_advantages_scratch_bytes(int64_t B, int64_t K);
// rewards [B, K] float32 (rewards_f64=false) or float64, ids [B] int64, out [B, K] float32.
// Group ids are hashed into an open-addressing table in `scratch` (atomicCAS on the key, atomicAdd
// of double sums), so ids need no sorting and no host sync. Ids equal to INT64_MIN are reserved.
cudaError_t launch_turn_advantages(const void* rewards, bool rewards_f64, const int64_t* ids, int64_t B, int64_t K,
                                   int est, double alpha, bool std_norm, double eps, float* out, void* scratch,
                                   cudaStream_t stream);
// vals [B, K] float32; ids [N] int64 (ids64) or int32; cu [B+1] int64 or null (then row = i / T).
cudaError_t launch_token_advantages(const float* vals, int64_t B, int64_t K, const void* ids, bool ids64,
                                    const int64_t* cu, int64_t T, int64_t N, float* out, cudaStream_t stream);
}  // namespace score
