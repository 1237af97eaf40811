// Paged KV-cache writes: schemas and CPU kernels of store_kv and copy_blocks. The copies are
// dtype-agnostic (bytes of one head row at a time). CUDA implementations: cuda/kv_cache_binding.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "common/kv_math.h"

namespace {

using score::CacheLayout;

CacheLayout layout_of(const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 4, "kv cache must be [num_blocks, block_size, heads, dim]");
  TORCH_CHECK(c.size(3) <= 1 || c.stride(3) == 1, "kv cache needs a contiguous last dim");
  return {c.size(0), c.size(1), c.size(2), c.size(3), c.stride(0), c.stride(1), c.stride(2)};
}

void check_pair(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
}

void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  check_pair(k_cache, v_cache);
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type(),
              "store_kv: key/value dtype must equal the cache dtype");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "store_kv: key/value must be [N, heads, dim]");
  const CacheLayout kc = layout_of(k_cache), vc = layout_of(v_cache);
  TORCH_CHECK(key.size(1) == kc.heads && key.size(2) == kc.dim, "store_kv: key does not match the cache");
  auto k = key.stride(2) == 1 ? key : key.contiguous();
  auto v = value.stride(2) == 1 ? value : value.contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0), "store_kv: slot_mapping must have one entry per key row");
  const int64_t n = k.size(0), es = k.element_size(), row_bytes = kc.dim * es;
  const int64_t capacity = kc.num_blocks * kc.block_size;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sp[i] < capacity, "store_kv: slot ", sp[i], " is out of range (cache holds ", capacity, ")");
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kcp = static_cast<char*>(k_cache.data_ptr());
  char* vcp = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = sp[i];
      if (s < 0) continue;
      for (int64_t h = 0; h < kc.heads; ++h) {
        std::memcpy(kcp + score::cache_row(kc, s, h) * es, kp + (i * k.stride(0) + h * k.stride(1)) * es, row_bytes);
        std::memcpy(vcp + score::cache_row(vc, s, h) * es, vp + (i * v.stride(0) + h * v.stride(1)) * es, row_bytes);
      }
    }
  });
}

void copy_blocks_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_mapping) {
  check_pair(k_cache, v_cache);
  const CacheLayout kc = layout_of(k_cache), vc = layout_of(v_cache);
  auto bm = block_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(bm.dim() == 2 && bm.size(1) == 2, "copy_blocks: block_mapping must be [M, 2]");
  const int64_t m = bm.size(0), es = k_cache.element_size(), row_bytes = kc.dim * es;
  const int64_t* p = bm.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * m; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < kc.num_blocks, "copy_blocks: block ", p[i], " is out of range");
  char* kcp = static_cast<char*>(k_cache.data_ptr());
  char* vcp = static_cast<char*>(v_cache.data_ptr());
  const int64_t rows = kc.block_size * kc.heads;  // head rows per block
  at::parallel_for(0, m * rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i = r / rows, off = (r % rows) / kc.heads, h = r % kc.heads;
      const int64_t src = p[2 * i], dst = p[2 * i + 1];
      std::memcpy(kcp + score::block_row(kc, dst, off, h) * es, kcp + score::block_row(kc, src, off, h) * es, row_bytes);
      std::memcpy(vcp + score::block_row(vc, dst, off, h) * es, vcp + score::block_row(vc, src, off, h) * es, row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(score_ext, m) {
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("copy_blocks(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(score_ext, CPU, m) {
  m.impl("store_kv", &store_kv_cpu);
  m.impl("copy_blocks", &copy_blocks_cpu);
}
