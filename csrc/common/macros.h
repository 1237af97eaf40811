// Shared by the CPU (g++) and CUDA (nvcc) builds: per-element math is written once, as
// SCORE_HD functions, so the CPU extension runs exactly the arithmetic the GPU runs.
#pragma once
#if defined(__CUDACC__)
#define SCORE_HD __host__ __device__ __forceinline__
#else
#define SCORE_HD inline
#endif
#include <cstdint>
#include <cmath>

// Host loops that should use the widest SIMD the CPU has: GCC/Clang compile one clone per target
// and pick at load time (ifunc). Only where ifunc exists (x86-64 Linux); elsewhere a plain function.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SCORE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SCORE_SIMD_CLONES
#endif
