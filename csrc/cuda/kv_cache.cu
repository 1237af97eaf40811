// Paged KV-cache writes on the GPU: one thread block per token (store_kv) or per (block, k|v)
// (copy_blocks), threads striding over the head rows; addressing shared with the CPU build.
#include "cuda/kv_cache.h"

namespace score {
namespace {

template <typename T>
__global__ void store_kv_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ k_cache,
                                T* __restrict__ v_cache, const int64_t* __restrict__ slots, int64_t ks_tok,
                                int64_t ks_head, int64_t vs_tok, int64_t vs_head, CacheLayout kc, CacheLayout vc) {
  const int64_t i = blockIdx.x;
  const int64_t s = slots[i];
  if (s < 0 || s >= kc.num_blocks * kc.block_size) return;
  const int64_t per_tok = kc.heads * kc.dim;
  for (int64_t e = threadIdx.x; e < per_tok; e += blockDim.x) {
    const int64_t h = e / kc.dim, d = e % kc.dim;
    k_cache[cache_row(kc, s, h) + d] = key[i * ks_tok + h * ks_head + d];
    v_cache[cache_row(vc, s, h) + d] = value[i * vs_tok + h * vs_head + d];
  }
}

template <typename T>
__global__ void copy_blocks_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache,
                                   const int64_t* __restrict__ mapping, CacheLayout kc, CacheLayout vc) {
  const int64_t src = mapping[2 * blockIdx.x], dst = mapping[2 * blockIdx.x + 1];
  if (src < 0 || dst < 0 || src >= kc.num_blocks || dst >= kc.num_blocks) return;
  T* cache = blockIdx.y == 0 ? k_cache : v_cache;
  const CacheLayout& c = blockIdx.y == 0 ? kc : vc;
  const int64_t per_block = c.block_size * c.heads * c.dim;
  for (int64_t e = threadIdx.x; e < per_block; e += blockDim.x) {
    const int64_t d = e % c.dim, h = (e / c.dim) % c.heads, off = e / (c.dim * c.heads);
    cache[block_row(c, dst, off, h) + d] = cache[block_row(c, src, off, h) + d];
  }
}

template <typename T>
cudaError_t store_kv_typed(const void* key, const void* value, void* k_cache, void* v_cache, const int64_t* slots,
                           int64_t n, int64_t ks_tok, int64_t ks_head, int64_t vs_tok, int64_t vs_head,
                           CacheLayout kc, CacheLayout vc, cudaStream_t stream) {
  const int threads = kc.heads * kc.dim >= 512 ? 256 : 128;
  store_kv_kernel<T><<<static_cast<unsigned>(n), threads, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache), static_cast<T*>(v_cache),
      slots, ks_tok, ks_head, vs_tok, vs_head, kc, vc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t copy_blocks_typed(void* k_cache, void* v_cache, const int64_t* mapping, int64_t m, CacheLayout kc,
                              CacheLayout vc, cudaStream_t stream) {
  copy_blocks_kernel<T><<<dim3(static_cast<unsigned>(m), 2), 256, 0, stream>>>(
      static_cast<T*>(k_cache), static_cast<T*>(v_cache), mapping, kc, vc);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_store_kv(const void* key, const void* value, void* k_cache, void* v_cache,
                            const int64_t* slots, int64_t n, int64_t key_s_tok, int64_t key_s_head,
                            int64_t val_s_tok, int64_t val_s_head, CacheLayout kc, CacheLayout vc,
                            int elem_size, cudaStream_t stream) {
  if (n == 0 || kc.heads * kc.dim == 0) return cudaSuccess;
  if (n > 0x7fffffff) return cudaErrorInvalidValue;
  switch (elem_size) {
    case 2: return store_kv_typed<uint16_t>(key, value, k_cache, v_cache, slots, n, key_s_tok, key_s_head, val_s_tok, val_s_head, kc, vc, stream);
    case 4: return store_kv_typed<uint32_t>(key, value, k_cache, v_cache, slots, n, key_s_tok, key_s_head, val_s_tok, val_s_head, kc, vc, stream);
    case 8: return store_kv_typed<uint64_t>(key, value, k_cache, v_cache, slots, n, key_s_tok, key_s_head, val_s_tok, val_s_head, kc, vc, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_copy_blocks(void* k_cache, void* v_cache, const int64_t* block_mapping, int64_t m,
                               CacheLayout kc, CacheLayout vc, int elem_size, cudaStream_t stream) {
  if (m == 0 || kc.block_size * kc.heads * kc.dim == 0) return cudaSuccess;
  if (m > 0x7fffffff) return cudaErrorInvalidValue;
  switch (elem_size) {
    case 2: return copy_blocks_typed<uint16_t>(k_cache, v_cache, block_mapping, m, kc, vc, stream);
    case 4: return copy_blocks_typed<uint32_t>(k_cache, v_cache, block_mapping, m, kc, vc, stream);
    case 8: return copy_blocks_typed<uint64_t>(k_cache, v_cache, block_mapping, m, kc, vc, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace score
