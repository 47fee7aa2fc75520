// Small vector helpers shared by the CPU ops: widen bf16 / fp16 / fp32 to fp32, 8 lanes at a time (AVX2 + FMA +
// F16C when the build enables them; QMOE_AVX2 says which).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../common/checks.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QMOE_AVX2 1
#endif

// Register-blocked kernels keep arrays of accumulators (__m256 acc[R][C]). GCC scalarises them into registers only
// when the small loops over R and C are unrolled early; otherwise (seen with GCC 12) it also stores every
// accumulator to the stack on each step of the hot loop, which halved the FMA rate. QMOE_UNROLL goes before those
// loops. Kernels are not inlined (QMOE_KERNEL) so that each gets its own register allocation.
#define QMOE_UNROLL _Pragma("GCC unroll 16")
#define QMOE_KERNEL __attribute__((noinline))

namespace qmoe {

using at::BFloat16;
using at::Half;

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) { return static_cast<float>(v); }
inline float to_float(Half v) { return static_cast<float>(v); }

// Reads a float32 / bfloat16 / float16 tensor (checked here, any layout) as its numel() fp32 values: plain loops
// rather than ATen's to(), whose per-call cost exceeds a decode step's worth of these conversions when caches are
// cold (docs/benchmarks.md); a prefill's many rows are split between threads.
inline void read_floats(const at::Tensor& t, float* dst, const char* op, const char* what) {
  const at::Tensor c = TensorArg(t, op, what, at::Device(at::kCPU)).floating().contiguous();
  with_floating(c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = c.data_ptr<T>();
    at::parallel_for(0, c.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<float>(p[i]);
    });
  });
}

#ifdef QMOE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend to 32 bits and shift into place.
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// e^x for 8 floats (within ~2 ulp): x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes'
// coefficients), 2^n put into the exponent bits. x is clamped to [-87.3, 88.3], where e^x is a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact first product
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// silu(v) = v / (1 + e^-v); a NaN in v stays NaN (it is the numerator).
inline __m256 silu8(__m256 v) {
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace qmoe
