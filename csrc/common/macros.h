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
