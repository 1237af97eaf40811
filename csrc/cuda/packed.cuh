// Packed (varlen) token layout shared by the .cu kernels (torch-free): cu holds B + 1 offsets.
#pragma once
#include <cstdint>

namespace score {
// Row of packed token i: the b with cu[b] <= i < cu[b+1], or -1 outside every sequence.
__device__ __forceinline__ int64_t packed_row(const int64_t* cu, int64_t B, int64_t i) {
  if (i < cu[0] || i >= cu[B]) return -1;
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (cu[mid + 1] <= i) lo = mid + 1; else hi = mid;
  }
  return lo;
}
}  // namespace score
