// CUDA implementations of score_ext::store_kv / copy_blocks; schemas live in cpu/kv_cache.cpp.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/common_binding.h"
#include "cuda/kv_cache.h"

namespace {

using score::CacheLayout;

CacheLayout layout_of(const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 4, "kv cache must be [num_blocks, block_size, heads, dim]");
  TORCH_CHECK(c.size(3) <= 1 || c.stride(3) == 1, "kv cache needs a contiguous last dim");
  return {c.size(0), c.size(1), c.size(2), c.size(3), c.stride(0), c.stride(1), c.stride(2)};
}

void store_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "store_kv: k_cache and v_cache differ");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type(),
              "store_kv: key/value dtype must equal the cache dtype");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "store_kv: key/value must be [N, heads, dim]");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const CacheLayout kc = layout_of(k_cache), vc = layout_of(v_cache);
  TORCH_CHECK(key.size(1) == kc.heads && key.size(2) == kc.dim, "store_kv: key does not match the cache");
  auto k = key.stride(2) == 1 ? key : key.contiguous();
  auto v = value.stride(2) == 1 ? value : value.contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0), "store_kv: slot_mapping must have one entry per key row");
  score::check_cuda(score::launch_store_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                           slots.data_ptr<int64_t>(), k.size(0), k.stride(0), k.stride(1),
                                           v.stride(0), v.stride(1), kc, vc, static_cast<int>(k.element_size()),
                                           score::current_stream(k_cache)),
                    "store_kv");
}

void copy_blocks_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_mapping) {
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "copy_blocks: k_cache and v_cache differ");
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, "copy_blocks: block_mapping must be [M, 2]");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  auto bm = block_mapping.to(at::kLong).contiguous();
  score::check_cuda(score::launch_copy_blocks(k_cache.data_ptr(), v_cache.data_ptr(), bm.data_ptr<int64_t>(),
                                              bm.size(0), layout_of(k_cache), layout_of(v_cache),
                                              static_cast<int>(k_cache.element_size()),
                                              score::current_stream(k_cache)),
                    "copy_blocks");
}

}  // namespace

TORCH_LIBRARY_IMPL(score_ext, CUDA, m) {
  m.impl("store_kv", &store_kv_cuda);
  m.impl("copy_blocks", &copy_blocks_cuda);
}
