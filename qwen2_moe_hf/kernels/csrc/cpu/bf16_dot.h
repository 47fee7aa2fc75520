// GEMMs of a few rows of bf16 activations with bf16 weights on AVX-512 BF16 (vdpbf16ps), the weights read in
// place in the hub's [N, K] row-major layout (no packing, so no second copy of any expert).
//
// Why: an expert of a 256-token batch gets ~17 rows. oneDNN's bf16 matmul reaches ~205 GFLOP/s on such a job with
// its weights coming from memory (2 threads, Zen 4), and the fp32-FMA kernels of moe_ffn_cpu.cpp ~200; this kernel
// ~280 (docs/benchmarks.md).
//
// Shape: the dot-product form. A tile of MR rows of x and NR weight rows keeps MR x NR accumulators of 16 fp32
// lanes; each step loads 32 bf16 of each of the MR + NR rows and issues MR x NR vdpbf16ps (each lane sums two
// products), and the lanes are summed once at the end of K. 6 x 4 tiles: 24 accumulators + 4 weight vectors + one
// x vector fit the 32 registers. A row of weights is 4 KiB at K = 2048, a page of its own, where the hardware
// prefetchers stop, so each tile fetches a share of the next weight rows into L2 as it computes (measured 1.15x).
//
// Numerics: x and w are bf16, products exact in fp32, sums in fp32 in a fixed order (the result does not depend
// on the thread count or the tile an element falls in). vdpbf16ps treats denormal bf16 inputs as zero.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "vec.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define QMOE_BF16_DOT 1
#endif

namespace qmoe {

#ifdef QMOE_BF16_DOT
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif

// Whether bf16 x bf16 jobs may take this kernel (where compiled); off for tests of the other paths and A/Bs.
inline std::atomic<bool>& bf16_dot_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

#ifdef QMOE_BF16_DOT
constexpr int kDotTileRows = 6;
constexpr int kDotTileCols = 4;

// y[i * ldy + j] = sum_k x[i * ldx + k] * w[j * ldw + k] for i < MR, j < NR. While it runs, it prefetches
// pf_step bytes per step of [pf, pf_end) into L2.
template <int MR, int NR>
QMOE_KERNEL void dot_tile(const BFloat16* x, int64_t ldx, const BFloat16* w, int64_t ldw, int64_t K, float* y,
                          int64_t ldy, const char* pf, const char* pf_end, int64_t pf_step) {
  __m512 acc[MR][NR];
  QMOE_UNROLL for (int i = 0; i < MR; ++i) {
    QMOE_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  auto step = [&](int64_t k, __mmask32 mask) {
    __m512bh wv[NR];
    QMOE_UNROLL for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + k);
    QMOE_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
      QMOE_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf < pf_end) {
      for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(pf + b, _MM_HINT_T1);
      pf += pf_step;
    }
    step(k, ~__mmask32(0));
  }
  if (k < K) step(k, (__mmask32(1) << (K - k)) - 1);  // zeros past K on both sides add nothing
  if constexpr (NR == 4) {
    // The four sums of a row at once: halves added, then three horizontal adds (3 + 8 + 2 instructions rather
    // than 4 full reductions).
    QMOE_UNROLL for (int i = 0; i < MR; ++i) {
      __m256 h[4];
      QMOE_UNROLL for (int j = 0; j < 4; ++j) {
        h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[i][j]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][j]), 1)));
      }
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      _mm_storeu_ps(y + i * ldy, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    }
  } else {
    QMOE_UNROLL for (int i = 0; i < MR; ++i) {
      QMOE_UNROLL for (int j = 0; j < NR; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

// dst[i] = src[i] rounded to bf16 (to nearest even; NaN stays NaN), 32 at a time: the activations for
// bf16_dot_rows. Denormals become zero, as vdpbf16ps would read them anyway.
inline void round_to_bf16(const float* src, int64_t n, BFloat16* dst) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  for (; i < n; ++i) dst[i] = static_cast<BFloat16>(src[i]);
}

template <int NR>
inline void dot_tile_rows(int64_t rows, const BFloat16* x, int64_t ldx, const BFloat16* w, int64_t K, float* y,
                          int64_t ldy, const char* pf, const char* pf_end, int64_t pf_step) {
  switch (rows) {
    case 6: return dot_tile<6, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
    case 5: return dot_tile<5, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
    case 4: return dot_tile<4, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
    case 3: return dot_tile<3, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
    case 2: return dot_tile<2, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
    default: return dot_tile<1, NR>(x, ldx, w, K, K, y, ldy, pf, pf_end, pf_step);
  }
}

// y[m * ldy + n] = sum_k x[m * K + k] * w[n * K + k] for all m < M and n in [n0, n1) of w's N rows. Weight rows go
// 4 at a time (the last 1-3 alone), each group against every 6-row block of x, while the next group is fetched.
inline void bf16_dot_rows(const BFloat16* x, int64_t M, int64_t K, const BFloat16* w, int64_t N, int64_t n0,
                          int64_t n1, float* y, int64_t ldy) {
  if (K <= 0) {  // empty sums
    for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.f);
    return;
  }
  const int64_t steps = ((K + 31) / 32) * ((M + kDotTileRows - 1) / kDotTileRows);
  const char* w_end = reinterpret_cast<const char*>(w + N * K);
  for (int64_t n = n0; n < n1; n += kDotTileCols) {
    const int64_t cols = std::min<int64_t>(kDotTileCols, n1 - n);
    const BFloat16* wn = w + n * K;
    // The next group's rows (within the weight), spread over this group's steps in whole cache lines.
    const char* pf = reinterpret_cast<const char*>(wn + cols * K);
    const char* pf_end = std::min(w_end, pf + kDotTileCols * K * int64_t(sizeof(BFloat16)));
    const int64_t pf_step = ((pf_end > pf ? pf_end - pf : 0) / steps + 63) / 64 * 64;
    for (int64_t m = 0; m < M; m += kDotTileRows) {
      const int64_t rows = std::min<int64_t>(kDotTileRows, M - m);
      const BFloat16* xm = x + m * K;
      float* ym = y + m * ldy + n;
      switch (cols) {
        case 4: dot_tile_rows<4>(rows, xm, K, wn, K, ym, ldy, pf, pf_end, pf_step); break;
        case 3: dot_tile_rows<3>(rows, xm, K, wn, K, ym, ldy, pf, pf_end, pf_step); break;
        case 2: dot_tile_rows<2>(rows, xm, K, wn, K, ym, ldy, pf, pf_end, pf_step); break;
        default: dot_tile_rows<1>(rows, xm, K, wn, K, ym, ldy, pf, pf_end, pf_step); break;
      }
      pf += pf_step * ((K + 31) / 32);
    }
  }
}
#endif

}  // namespace qmoe
