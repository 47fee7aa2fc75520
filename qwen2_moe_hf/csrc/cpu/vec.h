// Small vector helpers shared by the CPU ops: widen bf16 / fp16 / fp32 to fp32, 8 lanes at a time (AVX2 + FMA +
// F16C when the build enables them; QMOE_AVX2 says which).
#pragma once

#include <ATen/ATen.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QMOE_AVX2 1
#endif

namespace qmoe {

using at::BFloat16;
using at::Half;

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) { return static_cast<float>(v); }
inline float to_float(Half v) { return static_cast<float>(v); }

#ifdef QMOE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend to 32 bits and shift into place.
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace qmoe
