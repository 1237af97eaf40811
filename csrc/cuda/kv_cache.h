// Torch-free launchers for the paged KV-cache writes (raw pointers, sizes, a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common/kv_math.h"

namespace score {
// key/value rows: element (i, h, d) at i * s_tok + h * s_head + d. Slots < 0 or past the cache are
// skipped. elem_size: bytes per element (2, 4 or 8); the copy does not look at the dtype.
cudaError_t launch_store_kv(const void* key, const void* value, void* k_cache, void* v_cache,
                            const int64_t* slots, int64_t n, int64_t key_s_tok, int64_t key_s_head,
                            int64_t val_s_tok, int64_t val_s_head, CacheLayout kc, CacheLayout vc,
                            int elem_size, cudaStream_t stream);
// block_mapping: m rows of (src, dst) int64, device memory.
cudaError_t launch_copy_blocks(void* k_cache, void* v_cache, const int64_t* block_mapping, int64_t m,
                               CacheLayout kc, CacheLayout vc, int elem_size, cudaStream_t stream);
}  // namespace score
