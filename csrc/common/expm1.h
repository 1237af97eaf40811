// expm1 for the host loops of the CPU extension: branch-free, so GCC vectorises a loop over it.
// libm's expm1f is an opaque scalar call (about 10 ns); in token_kl's k3 loop it made the CPU
// extension 2x slower than torch's vectorised reference. On the device CUDA's expm1 is used.
//
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), expm1(r) by its Taylor series to r^8
// (truncation below 2e-9 relative), then expm1(x) = 2^n expm1(r) + (2^n - 1), which is free of
// cancellation for every n. Measured against float64 expm1: <= 2 ulp on [-88, 88] (tests).
#pragma once
#include "common/macros.h"

namespace score {

SCORE_HD float pow2i(int n) {  // 2^n for n in [-126, 127], through the exponent bits
  union { int32_t i; float f; } u;
  u.i = (n + 127) << 23;
  return u.f;
}

SCORE_HD float host_expm1f(float x) {
  const float kInvLn2 = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;       // 12 significant bits: n * kLn2Hi is exact
  const float kLn2Lo = 1.42860682030941723e-6f;  // ln2 - kLn2Hi
  const float kMax = 88.72283935546875f;         // expm1 overflows above
  float xc = x < -88.0f ? -88.0f : (x > kMax ? kMax : x);
  // round to nearest by the 1.5 * 2^23 trick: rintf is a libm call without SSE4.1, and |x / ln2| < 2^22
  float n = (xc * kInvLn2 + 12582912.0f) - 12582912.0f;
  float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 2.48015873e-5f;  // 1/8!
  p = p * r + 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  float em = r + r * r * p;  // expm1(r)
  // Every select below compares floats of the same width, so GCC if-converts it for AVX2 as well as
  // AVX-512 (an int-conditioned or x != x select left the AVX2 clone scalar: 12 ns an element).
  // n <= 127 keeps 2^n finite; for n = 128 (x in (88.38, kMax]) scale by 2^127 and then by 2.
  const bool hi = n > 127.0f;
  float nf = hi ? n - 1.0f : n;
  nf = nf >= -126.0f ? nf : -126.0f;  // below, 2^n (1 + em) is far under half an ulp of -1; NaN too
  float s = pow2i(static_cast<int>(nf));
  float y = s * em + (s - 1.0f);
  y = hi ? 2.0f * (s * (em + 1.0f)) - 1.0f : y;
  y = x > kMax ? HUGE_VALF : y;  // overflow, and +inf itself
  // NaN in, NaN out: a NaN x makes xc, n, r and em NaN (nf, clamped to -126 above, never converts a NaN
  // to int), and y = s * em + (s - 1) carries it.
  return y;
}

// The per-element math calls this: libm/CUDA expm1 on the device and for double (reference
// accuracy), the vectorisable one for float on the host.
template <typename T>
SCORE_HD T expm1_(T x) {
  return expm1(x);
}

template <>
SCORE_HD float expm1_<float>(float x) {
#if defined(__CUDA_ARCH__)
  return expm1f(x);
#else
  return host_expm1f(x);
#endif
}

}  // namespace score
