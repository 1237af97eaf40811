// Paged KV-cache addressing shared by the CPU (g++) and CUDA (nvcc) builds of store_kv/copy_blocks.
// A cache is [num_blocks, block_size, heads, dim] with any strides but a contiguous last dim;
// all strides are in elements.
#pragma once
#include "common/macros.h"

namespace score {

struct CacheLayout {
  int64_t num_blocks, block_size, heads, dim;
  int64_t s_block, s_off, s_head;
};

// Element offset of (slot, head, 0) where slot = block * block_size + offset.
SCORE_HD int64_t cache_row(const CacheLayout& c, int64_t slot, int64_t h) {
  return (slot / c.block_size) * c.s_block + (slot % c.block_size) * c.s_off + h * c.s_head;
}

// Element offset of (block, offset, head, 0).
SCORE_HD int64_t block_row(const CacheLayout& c, int64_t block, int64_t off, int64_t h) {
  return block * c.s_block + off * c.s_off + h * c.s_head;
}

}  // namespace score
