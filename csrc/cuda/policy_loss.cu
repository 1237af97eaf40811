// policy_loss CUDA kernels. The forward is one bandwidth-bound pass: every thread loads ITEMS
// tokens of each input (coalesced, all loads issued before any math), computes the loss term and
// dl/dlp with common/pg_math.h, stores dl, and keeps batch partials in registers. Row sums are
// taken per warp span (32 * ITEMS consecutive tokens): a span inside one row is warp-reduced into
// one atomicAdd per row value; only spans that straddle a row boundary fall back to per-token
// atomics. The grid is one wave of resident blocks (grid-stride); each block writes its batch
// partials to its own slot (no same-address atomics, which serialise in L2). A one-block
// finaliser reduces the slots and row sums into loss, stats and the row weights; backward is one
// scaling pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/pg_math.h"
#include "cuda/convert.cuh"
#include "cuda/packed.cuh"
#include "cuda/dtypes.h"
#include "cuda/policy_loss.h"

namespace score {
namespace {

constexpr int THREADS = 256;
constexpr int ITEMS = 4;
constexpr int SPAN = 32 * ITEMS;
// acc layout: [clipped, ratio, then per turn (n_k, kl_k, adv_k)]
constexpr int A_CLIP = 0, A_RATIO = 1, A_TURN = 2;
constexpr int ACC_N = A_TURN + 3 * PG_MAX_TURNS;
constexpr int MAX_BLOCKS = 4096;


// compute type: double for double inputs, float otherwise
template <typename T> struct CT { using type = float; };
template <> struct CT<double> { using type = double; };
template <typename T> __device__ __forceinline__ typename CT<T>::type up(T x) { return to_f(x); }
template <> __device__ __forceinline__ double up<double>(double x) { return x; }
template <typename T> __device__ __forceinline__ T down(typename CT<T>::type x) { return from_f<T>(x); }
template <> __device__ __forceinline__ double down<double>(double x) { return x; }

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int64_t row_of(const int64_t* cu, int64_t B, int64_t T, int64_t i) {
  if (cu) return packed_row(cu, B, i);
  // 32-bit division is a few times cheaper than the emulated 64-bit one
  return ((i | T) >> 31) == 0 ? (int64_t)((uint32_t)i / (uint32_t)T) : i / T;
}

template <typename T, typename I, int KM>
__global__ void __launch_bounds__(THREADS) pl_fwd_kernel(PLArgs a, PGParams p) {
  using C = typename CT<T>::type;
  using A = C;  // advantages arrive as float32 (float64 for double runs)
  const T* __restrict__ lp = static_cast<const T*>(a.lp);
  const T* __restrict__ old = static_cast<const T*>(a.old);
  const T* __restrict__ ref = static_cast<const T*>(a.ref);
  const A* __restrict__ adv = static_cast<const A*>(a.adv);
  const I* __restrict__ ids = static_cast<const I*>(a.ids);
  T* __restrict__ dl = static_cast<T*>(a.dl);
  double* rows = a.work + MAX_BLOCKS * ACC_N;
  const int K = p.num_turns;

  C bacc[A_TURN + 3 * KM];
#pragma unroll
  for (int j = 0; j < A_TURN + 3 * KM; ++j) bacc[j] = C(0);

  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (THREADS / 32);
  for (int64_t span = blockIdx.x * (int64_t)(THREADS / 32) + (threadIdx.x >> 5); span * SPAN < a.N; span += warps) {
    const int64_t s0 = span * SPAN;
    const int64_t s1 = min(s0 + SPAN, a.N) - 1;
    const int64_t r0 = row_of(a.cu, a.B, a.T, s0);
    const bool one_row = r0 >= 0 && r0 == row_of(a.cu, a.B, a.T, s1);  // warp-uniform
    I id[ITEMS];
    C x[ITEMS], xo[ITEMS], xr[ITEMS], xa[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t i = s0 + lane + 32 * j;
      id[j] = i < a.N ? ids[i] : I(-1);
    }
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t i = s0 + lane + 32 * j;
      const bool on = id[j] >= 0 && id[j] < K;  // masked tokens are never read: NaNs there stay out
      x[j] = on ? up(lp[i]) : C(0);
      xo[j] = on && p.has_old ? up(old[i]) : C(0);
      xr[j] = on && p.has_ref ? up(ref[i]) : C(0);
      xa[j] = on ? adv[i] : C(0);
    }
    C rpg = C(0), rkl = C(0), rn = C(0);
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t i = s0 + lane + 32 * j;
      if (i >= a.N) continue;
      const bool on = id[j] >= 0 && id[j] < K;
      if (!on) { dl[i] = down<T>(C(0)); continue; }
      const int k = (int)id[j];
      const C coef = C(p.kl_coef[k]);
      const PGToken<C> o = pg_token<C>(x[j], xo[j], xr[j], xa[j], coef, p);
      dl[i] = down<T>(o.dl);
      bacc[A_CLIP] += o.clipped ? C(1) : C(0);
      bacc[A_RATIO] += o.ratio;
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) {  // unrolled compare keeps the per-turn sums in registers
        const bool hit = kk == k;
        bacc[A_TURN + 3 * kk] += hit ? C(1) : C(0);
        bacc[A_TURN + 3 * kk + 1] += hit ? o.kl : C(0);
        bacc[A_TURN + 3 * kk + 2] += hit ? xa[j] : C(0);
      }
      const C klt = coef * o.kl;
      if (one_row) {
        rpg += o.pg; rkl += klt; rn += C(1);
      } else {
        const int64_t r = row_of(a.cu, a.B, a.T, i);
        if (r >= 0) {
          atomicAdd(&rows[3 * r], (double)o.pg);
          atomicAdd(&rows[3 * r + 1], (double)klt);
          atomicAdd(&rows[3 * r + 2], 1.0);
        }
      }
    }
    if (one_row) {
      rpg = warp_sum(rpg); rkl = warp_sum(rkl); rn = warp_sum(rn);
      if (lane == 0 && rn > C(0)) {
        atomicAdd(&rows[3 * r0], (double)rpg);
        atomicAdd(&rows[3 * r0 + 1], (double)rkl);
        atomicAdd(&rows[3 * r0 + 2], (double)rn);
      }
    }
  }

  // block reduction of the batch partials: warp shuffle, then one warp over the warp sums
  __shared__ C sh[THREADS / 32][A_TURN + 3 * KM];
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < A_TURN + 3 * KM; ++j) {
    const C v = warp_sum(bacc[j]);
    if (lane == 0) sh[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < A_TURN + 3 * KM) {
    double v = 0;
    for (int w = 0; w < THREADS / 32; ++w) v += (double)sh[w][threadIdx.x];
    a.work[blockIdx.x * ACC_N + threadIdx.x] = v;
  }
}

template <typename V>
__device__ V block_sum(V v, V* sh) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  V t = V(0);
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh[w];
  __syncthreads();
  return t;
}

// One block: S (rows with a policy token), denominators, row weights, loss and stats.
template <typename C>
__global__ void pl_finalize_kernel(PLArgs a, PGParams p) {
  __shared__ double sh[32];
  __shared__ double acc[ACC_N];
  const double* rows = a.work + MAX_BLOCKS * ACC_N;
  const int K = p.num_turns;
  {  // warp j sums slot j over the forward's blocks (ACC_N <= 32 warps)
    const int j = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (j < A_TURN + 3 * K) {
      double v = 0;
      for (int b = lane; b < a.nblocks; b += 32) v += a.work[b * ACC_N + j];
      v = warp_sum(v);
      if (lane == 0) acc[j] = v;
    }
  }
  __syncthreads();
  double seqs = 0;
  for (int64_t b = threadIdx.x; b < a.B; b += blockDim.x) seqs += rows[3 * b + 2] > 0 ? 1.0 : 0.0;
  seqs = block_sum(seqs, sh);
  double tokens = 0;
  for (int k = 0; k < K; ++k) tokens += acc[A_TURN + 3 * k];
  double denom;
  if (a.gcount) denom = (double)*static_cast<const C*>(a.gcount);
  else if (a.gcount_f > 0) denom = a.gcount_f;
  else denom = fmax(1.0, p.agg == AGG_TOKEN_MEAN ? tokens : seqs);
  double pg = 0, kl = 0;
  C* w = static_cast<C*>(a.row_w);
  for (int64_t b = threadIdx.x; b < a.B; b += blockDim.x) {
    const double wb = row_weight<double>(p.agg, rows[3 * b + 2], denom);
    w[b] = (C)wb;
    pg += wb * rows[3 * b];
    kl += wb * rows[3 * b + 1];
  }
  pg = block_sum(pg, sh);
  kl = block_sum(kl, sh);
  if (threadIdx.x == 0) {
    *static_cast<C*>(a.loss) = (C)(pg + kl);
    const double t1 = fmax(1.0, tokens);
    double kl_all = 0;
    for (int k = 0; k < K; ++k) kl_all += acc[A_TURN + 3 * k + 1];
    float* st = a.stats;
    st[ST_PG_LOSS] = (float)pg;
    st[ST_KL_LOSS] = (float)kl;
    st[ST_TOKENS] = (float)tokens;
    st[ST_SEQS] = (float)seqs;
    st[ST_CLIP_FRAC] = (float)(acc[A_CLIP] / t1);
    st[ST_RATIO_MEAN] = (float)(acc[A_RATIO] / t1);
    st[ST_KL_MEAN] = (float)(kl_all / t1);
    for (int k = 0; k < K; ++k) {
      const double nk = acc[A_TURN + 3 * k];
      st[stat_turn(k, 0, K)] = (float)(acc[A_TURN + 3 * k + 1] / fmax(1.0, nk));
      st[stat_turn(k, 1, K)] = (float)(acc[A_TURN + 3 * k + 2] / fmax(1.0, nk));
      st[stat_turn(k, 2, K)] = (float)nk;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) pl_bwd_kernel(const typename CT<T>::type* __restrict__ g,
                                                         const T* __restrict__ dl,
                                                         const typename CT<T>::type* __restrict__ w,
                                                         const int64_t* __restrict__ cu, int64_t B, int64_t T_,
                                                         int64_t N, T* __restrict__ grad) {
  using C = typename CT<T>::type;
  const C gs = g[0];
  const int64_t stride = (int64_t)gridDim.x * THREADS * ITEMS;
  for (int64_t base = blockIdx.x * (int64_t)THREADS * ITEMS + threadIdx.x; base < N; base += stride) {
    C d[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t i = base + j * THREADS;
      d[j] = i < N ? up(dl[i]) : C(0);
    }
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const int64_t i = base + j * THREADS;
      if (i >= N) continue;
      const int64_t r = row_of(cu, B, T_, i);
      // masked tokens hold dl == 0: keep them exactly 0 even if the upstream grad is inf/NaN
      grad[i] = down<T>(d[j] == C(0) || r < 0 ? C(0) : d[j] * (w[r] * gs));
    }
  }
}

unsigned grid_for(int64_t n, int64_t per_block) {
  int64_t b = (n + per_block - 1) / per_block;
  return (unsigned)(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

// One wave of resident blocks, at most MAX_BLOCKS partial slots.
template <typename K_>
unsigned wave_grid(K_ kernel, int64_t n) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, 0);
  int64_t wave = (int64_t)sms * (per_sm > 0 ? per_sm : 1);
  if (wave > MAX_BLOCKS) wave = MAX_BLOCKS;
  int64_t need = (n + (int64_t)THREADS * ITEMS - 1) / ((int64_t)THREADS * ITEMS);
  return (unsigned)(need < 1 ? 1 : (need < wave ? need : wave));
}

template <typename T, typename I>
cudaError_t fwd_typed(PLArgs a, const PGParams& p, cudaStream_t s) {
  using C = typename CT<T>::type;
  a.nblocks = 0;
  if (a.N > 0) {
    if (p.num_turns <= 2) {
      const unsigned grid = wave_grid(pl_fwd_kernel<T, I, 2>, a.N);
      a.nblocks = (int)grid;
      pl_fwd_kernel<T, I, 2><<<grid, THREADS, 0, s>>>(a, p);
    } else {
      const unsigned grid = wave_grid(pl_fwd_kernel<T, I, PG_MAX_TURNS>, a.N);
      a.nblocks = (int)grid;
      pl_fwd_kernel<T, I, PG_MAX_TURNS><<<grid, THREADS, 0, s>>>(a, p);
    }
  }
  pl_finalize_kernel<C><<<1, 1024, 0, s>>>(a, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_ids(const PLArgs& a, const PGParams& p, cudaStream_t s) {
  return a.ids64 ? fwd_typed<T, int64_t>(a, p, s) : fwd_typed<T, int32_t>(a, p, s);
}

template <typename T>
cudaError_t bwd_typed(const void* g, const void* dl, const void* w, const int64_t* cu, int64_t B, int64_t T_,
                      int64_t N, void* grad, cudaStream_t s) {
  using C = typename CT<T>::type;
  if (N == 0) return cudaSuccess;
  pl_bwd_kernel<T><<<grid_for(N, (int64_t)THREADS * ITEMS), THREADS, 0, s>>>(
      (const C*)g, (const T*)dl, (const C*)w, cu, B, T_, N, (T*)grad);
  return cudaGetLastError();
}

}  // namespace

size_t policy_loss_work_doubles(int64_t B) { return (size_t)MAX_BLOCKS * ACC_N + 3 * B; }

cudaError_t launch_policy_loss_fwd(const PLArgs& a, const PGParams& p, cudaStream_t stream) {
  if (p.num_turns < 1 || p.num_turns > PG_MAX_TURNS) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DT_F32: return fwd_ids<float>(a, p, stream);
    case DT_F16: return fwd_ids<__half>(a, p, stream);
    case DT_BF16: return fwd_ids<__nv_bfloat16>(a, p, stream);
    case DT_F64: return fwd_ids<double>(a, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_policy_loss_bwd(const void* g, const void* dl, const void* row_w, const int64_t* cu, int dtype,
                                   int64_t B, int64_t T, int64_t N, void* grad, cudaStream_t stream) {
  switch (dtype) {
    case DT_F32: return bwd_typed<float>(g, dl, row_w, cu, B, T, N, grad, stream);
    case DT_F16: return bwd_typed<__half>(g, dl, row_w, cu, B, T, N, grad, stream);
    case DT_BF16: return bwd_typed<__nv_bfloat16>(g, dl, row_w, cu, B, T, N, grad, stream);
    case DT_F64: return bwd_typed<double>(g, dl, row_w, cu, B, T, N, grad, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace score
