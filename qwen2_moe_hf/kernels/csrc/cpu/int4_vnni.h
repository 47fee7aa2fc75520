// The GPTQ 4-bit GEMM for bf16 and fp16 activations on CPUs with AVX-512 VNNI, at any number of rows: integer dot
// products, as llama.cpp's Q4 x Q8 kernels do, instead of widening every weight to fp32 (int4_gemm.h's `grouped`,
// which is compute-bound: ~26 vector ops per 64 weights on AVX2, ~4x its memory floor at one row).
//
// Per one-group run of packed rows (g_idx = k // G) and per row of x, with x in two int8 planes
//   x ~ sx * (hi + lo / 254),  sx = max|x| / 127 over the run,  hi = round(x / sx),  lo = round(254 (x / sx - hi))
//   y[n] += scales[g, n] * sx * (sum_k q[k, n] (hi[k] + lo[k] / 254) - (z[g, n] + zero_offset) * sum_k x[k] / sx)
// with the sums over q from vpdpbusd: one packed int32 holds inputs 8r..8r+7 of a column as nibbles, so
//   q & 0x0F0F0F0F        = bytes (q0, q2, q4, q6), dotted with the broadcast bytes (x0, x2, x4, x6)
//   (q >> 4) & 0x0F0F0F0F = bytes (q1, q3, q5, q7), dotted with (x1, x3, x5, x7)
// 16 columns x 8 inputs: 3 ops to unpack (shared by the rows of a tile), 2 vpdpbusd per plane and row. The zero
// correction uses the same quantized x, so the error is sum_k (q - z) (x - x~): below bf16's own rounding of the
// output with the second plane (measured: the same relative error as the float path, 1.7e-3 at the real shape).
// With fp16 activations (a GPTQ checkpoint's default compute dtype) the error stays at fp16's own rounding of the
// output (measured at 2048 -> 1408: 2.2e-4 per row against 2.15e-4 for the float path; int4_gemm.h's int4_path).
// fp32 activations never come here. A NaN or infinity in a run of x makes that run's contribution NaN.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "vec.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QMOE_VNNI 1
#endif

namespace qmoe {

// Whether int4_matmul may take this path (compiled in, and not switched off: tests run both paths here).
inline std::atomic<bool>& vnni_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

// Whether a single row takes grouped_vnni_row (on) or the multi-row kernel (grouped_vnni): the same result.
inline std::atomic<bool>& vnni_row_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

#ifdef QMOE_VNNI
constexpr bool kHaveVnni = true;

namespace int4_vnni_detail {

inline __m512 scales16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 scales16(const at::BFloat16* p, __mmask16 k) {
  const __m256i v = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 scales16(const at::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// The zeros of columns n .. n+15 (two qzeros words), as float, plus the format's offset.
inline __m512 zeros16(const int32_t* zrow, int64_t n, __mmask16 k, float offset) {
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const int32_t hi = k > 0xFF ? zrow[n / 8 + 1] : 0;
  const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(zrow[n / 8])),
                                           _mm256_set1_epi32(hi), 1);
  const __m512i z = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15));
  return _mm512_add_ps(_mm512_cvtepi32_ps(z), _mm512_set1_ps(offset));
}

// Packed rows ahead to prefetch: further than the float path's 6, as each row goes ~1.4x faster here (16 against 6
// measured 2.68 against 2.87 ms for the 1-token int4 block from DRAM: within the noise, not worse).
constexpr int64_t kVnniPrefetchRows = 16;

inline __mmask16 cols_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// x's four broadcasts for one packed row (VnniActs::at): hi of inputs (0, 2, 4, 6), hi of (1, 3, 5, 7), lo of the
// even ones, lo of the odd ones.
struct RowPlanes {
  __m512i he, ho, le, lo;
  explicit RowPlanes(const int32_t* b)
      : he(_mm512_set1_epi32(b[0])), ho(_mm512_set1_epi32(b[1])), le(_mm512_set1_epi32(b[2])),
        lo(_mm512_set1_epi32(b[3])) {}
};

// One vector of packed words (16 columns x 8 inputs) into its hi-plane sums s and lo-plane sums t.
inline void dot_packed(__m512i q, const RowPlanes& x, __m512i& s, __m512i& t) {
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  const __m512i even = _mm512_and_si512(q, nib);                       // bytes (q0, q2, q4, q6) of each column
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(q, 4), nib);  // (q1, q3, q5, q7)
  s = _mm512_dpbusd_epi32(s, even, x.he);
  t = _mm512_dpbusd_epi32(t, even, x.le);
  s = _mm512_dpbusd_epi32(s, odd, x.ho);
  t = _mm512_dpbusd_epi32(t, odd, x.lo);
}

// A run's epilogue for one vector of 16 columns: y + scales * sx * (s + t / 254 - (z + offset) * sum x), in the
// one order every kernel here uses (so that their results agree bit for bit).
inline __m512 run_epilogue(__m512i s, __m512i t, __m512 sc, __m512 z, float sx, float xsum, __m512 y) {
  const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(1.f / 254.f), _mm512_cvtepi32_ps(s));
  const __m512 centred = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum), dot);
  return _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(sx)), centred, y);
}

}  // namespace int4_vnni_detail

// One run of one x row (len values, a multiple of 8: whole packed rows) as two int8 planes, written as the kernels
// read them (VnniActs: per packed row, hi of inputs (0, 2, 4, 6), hi of (1, 3, 5, 7), lo of the even ones, lo of
// the odd ones; 16 bytes at out + 2 * k for inputs k .. k+7), with the run's scale sx (NaN when the run holds a
// NaN or an infinity) and sum(hi + lo / 254). Vectorized (std::nearbyint per value, a libm call, cost more than the
// GEMM it fed at one row), the planes' bytes put in place by one shuffle per 16 inputs instead of a byte loop over
// separate hi / lo buffers afterwards: 2,002 -> 1,612 cycles per 2,048 inputs warm, 7,470 -> 4,201 in a decode step.
inline void quantize_run(const float* x, int64_t len, int8_t* out, float& sx, float& xsum) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512 vmax = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(int4_vnni_detail::cols_mask(len - k), x + k);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    bad = _mm512_add_ps(bad, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN iff some value is NaN or infinite
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const bool finite = !std::isnan(_mm512_reduce_add_ps(bad));
  sx = finite ? amax / 127.f : NAN;
  const __m512 inv = _mm512_set1_ps(finite && amax > 0.f ? 127.f / amax : 0.f);
  const __m512 k254 = _mm512_set1_ps(254.f);
  // Bytes of 16 inputs -> (0, 2, 4, 6, 1, 3, 5, 7) of the first 8, then the same of the next 8.
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(int4_vnni_detail::cols_mask(len - k), x + k), inv);
    const __m512 h = _mm512_roundscale_ps(v, kRound);  // |v| <= 127
    const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), k254), kRound);  // |l| <= 127
    const __m512i hi32 = _mm512_cvtps_epi32(h), lo32 = _mm512_cvtps_epi32(l);
    const __m128i hb = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(hi32), order);
    const __m128i lb = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(lo32), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * k), _mm_unpacklo_epi64(hb, lb));
    if (k + 8 < len) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * k + 16), _mm_unpackhi_epi64(hb, lb));
    sum_hi = _mm512_add_epi32(sum_hi, hi32);  // masked-off lanes loaded 0: they add 0
    sum_lo = _mm512_add_epi32(sum_lo, lo32);
  }
  xsum = static_cast<float>(_mm512_reduce_add_epi32(sum_hi)) +
         static_cast<float>(_mm512_reduce_add_epi32(sum_lo)) / 254.f;
}

// x of one int4_matmul call as two int8 planes, x ~ sx * (hi + lo / 254): hi = round(x / sx),
// lo = round(254 * (x / sx - hi)), sx per row and run. One plane (llama.cpp's Q8 activations) is 0.7% off per
// output row at the real shape, enough to fail the 5% logits bound of a bf16 GPTQ model 3 layers deep; with the
// second its error is ~1/254 of that (below bf16's own rounding), for two more vpdpbusd per 16 columns x 8 inputs.
// Made once per call, before the threads split the columns. Per row m and packed row r, 16 bytes: hi of inputs
// (0, 2, 4, 6), hi of (1, 3, 5, 7), lo of the even ones, lo of the odd ones, so that each broadcast the kernel
// needs is one aligned 4-byte load.
struct VnniActs {
  int64_t M = 0, rows = 0, R = 0;
  std::vector<int8_t> planes;   // [M][rows][16]
  std::vector<float> sx, xsum;  // [M][R]: the run's scale, and sum(hi + lo / 254) (the zero correction's)

  VnniActs(const Int4Weight& w, const float* x, int64_t M_, int64_t ldx)
      : M(M_), rows(w.K / 8), R(w.num_runs()), planes(M_ * (w.K / 8) * 16), sx(M_ * R), xsum(M_ * R) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t run = 0; run < R; ++run) {
          const int64_t k0 = 8 * w.runs[run], len = 8 * (w.runs[run + 1] - w.runs[run]);
          quantize_run(x + m * ldx + k0, len, planes.data() + m * rows * 16 + 2 * k0, sx[m * R + run],
                       xsum[m * R + run]);
        }
      }
    });
  }
  const int32_t* at(int64_t m, int64_t r) const {
    return reinterpret_cast<const int32_t*>(planes.data() + (m * rows + r) * 16);
  }
};

// Rows of x per register tile of the multi-row kernel, and vectors of 16 columns: MR x C x 2 int32 sums (hi and
// lo plane) stay in registers over a run, with C x 2 unpacked weight vectors. Measured (Zen 4, 2 threads, GF/s at
// 8 / 16 / 128 rows, K=2048 N=5632): 8 x 1 364 / 368 / 355, 12 x 1 363 / 327 / 330, 6 x 1 315 / 329 / 353,
// 4 x 2 311 / 319 / 340 (the kernel it replaced, sums through memory per packed row: 162 at 8 rows).
constexpr int kVnniTileRows = 8;
constexpr int kVnniTileVecs = 1;
static_assert(64 % (16 * kVnniTileVecs) == 0, "a tile's columns must not cross a 64-column block of the layout");

// y[m0 .. m0+MR, nb .. nb+16C) += x . W over every run, grouped weights only (w.runs non-empty); mask[c]: the
// columns of vector c that exist (0: none). Per run the int32 sums are exact, and its epilogue is
// grouped_vnni_row's, in the same order of runs, so each row's result is bit for bit that kernel's.
template <typename S, int MR, int C>
QMOE_KERNEL void vnni_tile(const Int4Weight& w, const S* scales, const VnniActs& a, int64_t m0, int64_t nb,
                           const __mmask16* mask, float* y, int64_t ldy) {
  using namespace int4_vnni_detail;
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t run = 0; run < a.R; ++run) {
    __m512i s[MR][C], t[MR][C];
    QMOE_UNROLL
    for (int m = 0; m < MR; ++m) {
      QMOE_UNROLL
      for (int c = 0; c < C; ++c) s[m][c] = t[m][c] = _mm512_setzero_si512();
    }
    for (int64_t r = w.runs[run]; r < w.runs[run + 1]; ++r) {
      const int32_t* qrow = w.q_at(r, nb);  // 16C columns from nb: within one 64-column block (blocked layout)
      __m512i even[C], odd[C];
      QMOE_UNROLL
      for (int c = 0; c < C; ++c) {
        const __m512i q = _mm512_maskz_loadu_epi32(mask[c], qrow + 16 * c);
        even[c] = _mm512_and_si512(q, nib);                       // bytes (q0, q2, q4, q6) of each column
        odd[c] = _mm512_and_si512(_mm512_srli_epi32(q, 4), nib);  // (q1, q3, q5, q7)
      }
      QMOE_UNROLL
      for (int m = 0; m < MR; ++m) {
        const int32_t* xp = a.at(m0 + m, r);
        const __m512i he = _mm512_set1_epi32(xp[0]), ho = _mm512_set1_epi32(xp[1]);
        const __m512i le = _mm512_set1_epi32(xp[2]), lodd = _mm512_set1_epi32(xp[3]);
        QMOE_UNROLL
        for (int c = 0; c < C; ++c) {
          s[m][c] = _mm512_dpbusd_epi32(s[m][c], even[c], he);
          t[m][c] = _mm512_dpbusd_epi32(t[m][c], even[c], le);
          s[m][c] = _mm512_dpbusd_epi32(s[m][c], odd[c], ho);
          t[m][c] = _mm512_dpbusd_epi32(t[m][c], odd[c], lodd);
        }
      }
    }
    // y += s * sx * (hi dot + lo dot / 254 - z * sum x), once per run.
    const int32_t g = w.g_idx[8 * w.runs[run]];
    const S* srow = scales + g * w.N;
    const int32_t* zrow = w.qzeros + g * (w.N / 8);
    QMOE_UNROLL
    for (int c = 0; c < C; ++c) {
      if (mask[c] == 0) continue;  // past n1: no scales or zeros there to read
      const int64_t n = nb + 16 * c;
      const __m512 sc = scales16(srow + n, mask[c]);
      const __m512 z = zeros16(zrow, n, mask[c], w.zero_offset);
      QMOE_UNROLL
      for (int m = 0; m < MR; ++m) {
        const int64_t i = (m0 + m) * a.R + run;
        float* o = y + (m0 + m) * ldy + n;
        _mm512_mask_storeu_ps(o, mask[c], run_epilogue(s[m][c], t[m][c], sc, z, a.sx[i], a.xsum[i],
                                                       _mm512_maskz_loadu_ps(mask[c], o)));
      }
    }
  }
}

// The last a.M - m0 (< MR) rows of x by one tile of that height.
template <typename S, int MR, int C>
void vnni_tail(const Int4Weight& w, const S* scales, const VnniActs& a, int64_t m0, int64_t nb,
               const __mmask16* mask, float* y, int64_t ldy) {
  if constexpr (MR > 0) {
    if (a.M - m0 == MR) return vnni_tile<S, MR, C>(w, scales, a, m0, nb, mask, y, ldy);
    vnni_tail<S, MR - 1, C>(w, scales, a, m0, nb, mask, y, ldy);
  }
}

// y[m, n] += x[m] . W[n] for every row of `a` and n in [n0, n1) (a multiple of 8; of 64 for blocked weights), by
// register tiles of kVnniTileRows rows x 16 kVnniTileVecs columns: a tile's weights (16C columns x K/8 words) stay
// in L1/L2 while every row of x passes over them, so they come from memory once per call.
template <typename S>
void grouped_vnni(const Int4Weight& w, const S* scales, const VnniActs& a, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  using namespace int4_vnni_detail;
  constexpr int MR = kVnniTileRows, C = kVnniTileVecs;
  for (int64_t nb = n0; nb < n1; nb += 16 * C) {
    __mmask16 mask[C];
    for (int c = 0; c < C; ++c) mask[c] = nb + 16 * c < n1 ? cols_mask(n1 - nb - 16 * c) : __mmask16(0);
    int64_t m0 = 0;
    for (; m0 + MR <= a.M; m0 += MR) vnni_tile<S, MR, C>(w, scales, a, m0, nb, mask, y, ldy);
    if (m0 < a.M) vnni_tail<S, MR - 1, C>(w, scales, a, m0, nb, mask, y, ldy);
  }
}

// Two whole 64-column blocks of the blocked layout for one row of x (grouped_vnni_row's, below), their packed rows
// walked in step: two contiguous streams per thread instead of one, and one set of broadcasts for 16 vectors. The
// 1-token int4 block's moe_layer 1.47 -> 1.34x its floor in the VM's fast memory phase, the 4-layer GPTQ model's
// decode step 10.60 -> 10.07 ms (in-process A/B, docs/benchmarks.md). 16 int32 sums stay in registers; y goes
// through memory once per run, in the same operations and order as grouped_vnni_row's, so the result is bit for
// bit that kernel's. Three blocks in step were slower (24 sums: spills).
template <typename S>
void vnni_row_pair(const Int4Weight& w, const S* scales, const VnniActs& acts, int64_t nb, float* y) {
  using namespace int4_vnni_detail;
  constexpr int C = 8;  // vectors of 16 columns: 4 per block
  const int64_t R = w.num_runs();
  for (int64_t run = 0; run < R; ++run) {
    __m512i s[C], t[C];
    QMOE_UNROLL
    for (int c = 0; c < C; ++c) s[c] = t[c] = _mm512_setzero_si512();
    for (int64_t r = w.runs[run]; r < w.runs[run + 1]; ++r) {
      const RowPlanes x(acts.at(0, r));
      const int32_t* rows[2] = {w.q_at(r, nb), w.q_at(r, nb + kInt4BlockCols)};
      QMOE_UNROLL
      for (int c = 0; c < C; ++c) dot_packed(_mm512_loadu_si512(rows[c / 4] + 16 * (c % 4)), x, s[c], t[c]);
    }
    const int32_t g = w.g_idx[8 * w.runs[run]];
    const S* srow = scales + g * w.N;
    const int32_t* zrow = w.qzeros + g * (w.N / 8);
    QMOE_UNROLL
    for (int c = 0; c < C; ++c) {
      const int64_t n = nb + 16 * c;
      const __m512 sc = scales16(srow + n, __mmask16(0xFFFF));
      const __m512 z = zeros16(zrow, n, __mmask16(0xFFFF), w.zero_offset);
      _mm512_storeu_ps(y + n, run_epilogue(s[c], t[c], sc, z, acts.sx[run], acts.xsum[run], _mm512_loadu_ps(y + n)));
    }
  }
}

// The same product for one row of x (a decode step), with every sum in registers: per block of 64 columns
// (4 vectors of 16), the packed rows are walked front to back, so the int32 sums of a run and the fp32 sums of y
// never go through memory; each run ends in the same epilogue as grouped_vnni, in the same order, so the result is
// bit for bit grouped_vnni's for that row. x's planes are VnniActs' (made once for all runs), so each of the four
// broadcasts is one 4-byte load: building them from single bytes (~40 scalar ops per packed row) held the loop
// below its 16 vpdpbusd per packed row, 1.16x slower from cache (one thread, Zen 4: 47.5 against 55.2 GB/s).
// Unpacking the odd nibbles without the shift (their x16 values dotted into sums of their own, folded in at the end
// of a run) needs 16 int32 sums instead of 8 and ran at 37.5; GFNI's affine shift instead of shift + and at 45.3:
// neither kept. The block's next packed rows are prefetched kVnniPrefetchRows ahead for the checkpoint layout (at
// the end of a block, the next block's first rows). Blocked weights go by pairs of blocks (vnni_row_pair) where
// two whole blocks remain.
template <typename S>
void grouped_vnni_row(const Int4Weight& w, const S* scales, const VnniActs& acts, int64_t n0, int64_t n1, float* y) {
  using namespace int4_vnni_detail;
  constexpr int C = 4;  // vectors of 16 columns per block: 4 hi + 4 lo + 4 y sums, 4 broadcasts, a few temporaries
  const int64_t R = w.num_runs(), rows = w.K / 8;
  if (w.blocked) {  // n0 on a block: whole pairs of blocks first, then any last block (or part of one) below
    for (; n0 + 2 * kInt4BlockCols <= n1; n0 += 2 * kInt4BlockCols) vnni_row_pair<S>(w, scales, acts, n0, y);
  }
  for (int64_t nb = n0; nb < n1; nb += 16 * C) {
    __mmask16 mask[C];
    for (int c = 0; c < C; ++c) mask[c] = nb + 16 * c < n1 ? cols_mask(n1 - nb - 16 * c) : __mmask16(0);
    const int64_t next = nb + 16 * C < n1 ? nb + 16 * C : -1;  // the next block, for the prefetch at the end
    __m512 yv[C];
    for (int c = 0; c < C; ++c) yv[c] = _mm512_maskz_loadu_ps(mask[c], y + nb + 16 * c);
    for (int64_t run = 0; run < R; ++run) {
      __m512i s[C], t[C];
      for (int c = 0; c < C; ++c) s[c] = t[c] = _mm512_setzero_si512();
      for (int64_t r = w.runs[run]; r < w.runs[run + 1]; ++r) {
        // Blocked weights (n0, hence nb, on a block): the block's rows are one contiguous stream, which the
        // hardware prefetchers follow on their own (software prefetch 8-1024 rows ahead: no faster, up to 18%
        // slower for the 1-token block).
        const int32_t* qrow = w.q_at(r, nb);
        const int64_t ahead = r + kVnniPrefetchRows;
        const int32_t* pf = w.blocked ? nullptr
                            : ahead < rows ? w.qweight + ahead * w.N + nb
                                           : (next >= 0 ? w.qweight + (ahead - rows) * w.N + next : nullptr);
        if (pf != nullptr) {
          // Into L2 (T1): from DRAM ~19-20 GB/s against ~15 into L1 (T0) at distances 8-32, 2 threads, Zen 4.
          for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * c), _MM_HINT_T1);
        }
        const RowPlanes xr(acts.at(0, r));
        for (int c = 0; c < C; ++c) dot_packed(_mm512_maskz_loadu_epi32(mask[c], qrow + 16 * c), xr, s[c], t[c]);
      }
      const int32_t g = w.g_idx[8 * w.runs[run]];
      const S* srow = scales + g * w.N;
      const int32_t* zrow = w.qzeros + g * (w.N / 8);
      for (int c = 0; c < C; ++c) {
        if (mask[c] == 0) continue;  // past n1: no scales or zeros there to read
        const int64_t n = nb + 16 * c;
        const __m512 sc = scales16(srow + n, mask[c]);
        const __m512 z = zeros16(zrow, n, mask[c], w.zero_offset);
        yv[c] = run_epilogue(s[c], t[c], sc, z, acts.sx[run], acts.xsum[run], yv[c]);
      }
    }
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + nb + 16 * c, mask[c], yv[c]);
  }
}

// The same, x's planes made here, in the calling thread.
template <typename S>
void grouped_vnni_row(const Int4Weight& w, const S* scales, const float* x, int64_t n0, int64_t n1, float* y) {
  grouped_vnni_row<S>(w, scales, VnniActs(w, x, 1, w.K), n0, n1, y);
}

// A thread's planes of x for its one-row jobs in one parallel region: made again only when a job's x or its
// weight's runs differ from the last job's. A decode step's MoE block runs the gate and up projections of every
// routed expert and the shared expert on the same token: one quantization of x for those ten jobs instead of ten.
class RowActs {
 public:
  const VnniActs& get(const Int4Weight& w, const float* x) {
    if (!acts_ || x != x_ || w.K != K_ || w.runs != runs_) {
      acts_ = std::make_unique<VnniActs>(w, x, 1, w.K);
      x_ = x;
      K_ = w.K;
      runs_ = w.runs;
    }
    return *acts_;
  }

 private:
  std::unique_ptr<VnniActs> acts_;
  const float* x_ = nullptr;
  int64_t K_ = -1;
  std::vector<int64_t> runs_;
};
#else
constexpr bool kHaveVnni = false;
#endif

}  // namespace qmoe
