// turn_advantages: a segmented group reduction without host sync. Group ids are not sorted, so
// each sample inserts its id into an open-addressing hash table in global memory (atomicCAS) and
// adds its shaped rewards to that slot (double atomicAdd); a second pass reads its group's sums.
// Small batches (the usual case: B ~ 1k) run all phases in one block separated by
// __syncthreads(), i.e. one launch; large ones run one kernel per phase.
#include <cstdint>

#include "common/adv_math.h"
#include "cuda/advantages.h"
#include "cuda/packed.cuh"

namespace score {
namespace {

constexpr unsigned long long EMPTY = 0x8000000000000000ULL;  // INT64_MIN: reserved id
constexpr int64_t SINGLE_BLOCK_MAX_B = 8192;

struct Table {
  unsigned long long* keys;
  double* cnt;
  double* sum;
  double* m2;
  int* slot;
  int64_t cap;  // power of two >= 2B
};

int64_t table_cap(int64_t B) {
  int64_t c = 2;
  while (c < 2 * B) c <<= 1;
  return c;
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

Table carve(void* scratch, int64_t B, int64_t K) {
  Table t;
  t.cap = table_cap(B);
  char* p = static_cast<char*>(scratch);
  t.keys = reinterpret_cast<unsigned long long*>(p); p += align256(t.cap * 8);
  t.cnt = reinterpret_cast<double*>(p); p += align256(t.cap * 8);
  t.sum = reinterpret_cast<double*>(p); p += align256(t.cap * K * 8);
  t.m2 = reinterpret_cast<double*>(p); p += align256(t.cap * K * 8);
  t.slot = reinterpret_cast<int*>(p);
  return t;
}

template <typename R>
struct Adv {
  const R* r;
  const int64_t* ids;
  int64_t B, K;
  int est;
  double alpha, eps;
  bool std_norm, single;  // single: one group (the batch), for "reinforce"
  float* out;
  Table t;

  __device__ double shaped(int64_t i, int64_t k) const {
    return shaped_reward<double>((double)r[i * K + k], k ? (double)r[i * K + k - 1] : 0.0, (int)k, alpha);
  }
  __device__ void init(int64_t j) const {
    t.keys[j] = EMPTY;
    t.cnt[j] = 0.0;
    for (int64_t k = 0; k < K; ++k) { t.sum[j * K + k] = 0.0; t.m2[j * K + k] = 0.0; }
  }
  __device__ void insert(int64_t i) const {
    const unsigned long long key = single ? 0ULL : (unsigned long long)ids[i];
    int64_t h = (int64_t)(mix64(key) & (unsigned long long)(t.cap - 1));
    while (true) {  // linear probing; the table is at most half full
      const unsigned long long prev = atomicCAS(&t.keys[h], EMPTY, key);
      if (prev == EMPTY || prev == key) break;
      h = (h + 1) & (t.cap - 1);
    }
    t.slot[i] = (int)h;
    atomicAdd(&t.cnt[h], 1.0);
    for (int64_t k = 0; k < K; ++k) atomicAdd(&t.sum[h * K + k], shaped(i, k));
  }
  __device__ void deviations(int64_t i) const {
    const int h = t.slot[i];
    for (int64_t k = 0; k < K; ++k) {
      const double d = shaped(i, k) - t.sum[h * K + k] / t.cnt[h];
      atomicAdd(&t.m2[h * K + k], d * d);
    }
  }
  __device__ void finish(int64_t i) const {
    if (est == ADV_NONE) {
      for (int64_t k = 0; k < K; ++k) out[i * K + k] = (float)shaped(i, k);
      return;
    }
    const int h = t.slot[i];
    for (int64_t k = 0; k < K; ++k)
      out[i * K + k] = (float)advantage_value<double>(shaped(i, k), t.sum[h * K + k], t.cnt[h], t.m2[h * K + k],
                                                      est, std_norm, eps);
  }
};

template <typename R>
__global__ void adv_single_block(Adv<R> a) {
  for (int64_t j = threadIdx.x; j < a.t.cap; j += blockDim.x) a.init(j);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.B; i += blockDim.x) a.insert(i);
  __syncthreads();
  if (a.std_norm) {
    for (int64_t i = threadIdx.x; i < a.B; i += blockDim.x) a.deviations(i);
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < a.B; i += blockDim.x) a.finish(i);
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); \
                               i += (int64_t)gridDim.x * blockDim.x)
template <typename R> __global__ void adv_init(Adv<R> a) { GRID_STRIDE(j, a.t.cap) a.init(j); }
template <typename R> __global__ void adv_insert(Adv<R> a) { GRID_STRIDE(i, a.B) a.insert(i); }
template <typename R> __global__ void adv_dev(Adv<R> a) { GRID_STRIDE(i, a.B) a.deviations(i); }
template <typename R> __global__ void adv_finish(Adv<R> a) { GRID_STRIDE(i, a.B) a.finish(i); }

unsigned blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return (unsigned)(b < 1 ? 1 : (b > 65535 * 4 ? 65535 * 4 : b));
}

template <typename R>
cudaError_t run_adv(const Adv<R>& a, cudaStream_t s) {
  if (a.est == ADV_NONE) {
    adv_finish<R><<<blocks_for(a.B, 256), 256, 0, s>>>(a);
  } else if (a.B <= SINGLE_BLOCK_MAX_B) {
    adv_single_block<R><<<1, 1024, 0, s>>>(a);
  } else {
    adv_init<R><<<blocks_for(a.t.cap, 256), 256, 0, s>>>(a);
    adv_insert<R><<<blocks_for(a.B, 256), 256, 0, s>>>(a);
    if (a.std_norm) adv_dev<R><<<blocks_for(a.B, 256), 256, 0, s>>>(a);
    adv_finish<R><<<blocks_for(a.B, 256), 256, 0, s>>>(a);
  }
  return cudaGetLastError();
}

template <typename I>
__global__ void token_adv_kernel(const float* __restrict__ vals, int64_t B, int64_t K, const I* __restrict__ ids,
                                 const int64_t* __restrict__ cu, int64_t T, int64_t N, float* __restrict__ out) {
  GRID_STRIDE(i, N) {
    const int64_t id = (int64_t)ids[i];
    const int64_t row = cu ? packed_row(cu, B, i) : i / T;
    out[i] = (id >= 0 && id < K && row >= 0) ? vals[row * K + id] : 0.0f;
  }
}

}  // namespace

size_t turn_advantages_scratch_bytes(int64_t B, int64_t K) {
  const int64_t cap = table_cap(B);
  return align256(cap * 8) * 2 + align256(cap * K * 8) * 2 + align256(B * 4);
}

cudaError_t launch_turn_advantages(const void* rewards, bool rewards_f64, const int64_t* ids, int64_t B, int64_t K,
                                   int est, double alpha, bool std_norm, double eps, float* out, void* scratch,
                                   cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  const Table t = carve(scratch, B, K);
  const bool single = est == ADV_REINFORCE;
  const bool sn = std_norm && (est == ADV_GRPO || est == ADV_REINFORCE);
  if (rewards_f64)
    return run_adv(Adv<double>{(const double*)rewards, ids, B, K, est, alpha, eps, sn, single, out, t}, stream);
  return run_adv(Adv<float>{(const float*)rewards, ids, B, K, est, alpha, eps, sn, single, out, t}, stream);
}

cudaError_t launch_token_advantages(const float* vals, int64_t B, int64_t K, const void* ids, bool ids64,
                                    const int64_t* cu, int64_t T, int64_t N, float* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const unsigned grid = blocks_for(N, 256);
  if (ids64)
    token_adv_kernel<int64_t><<<grid, 256, 0, stream>>>(vals, B, K, (const int64_t*)ids, cu, T, N, out);
  else
    token_adv_kernel<int32_t><<<grid, 256, 0, stream>>>(vals, B, K, (const int32_t*)ids, cu, T, N, out);
  return cudaGetLastError();
}

}  // namespace score
