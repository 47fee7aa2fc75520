// The MoE layer's feed-forward on CPU in one op: routed experts (grouped by expert) + the gated shared expert.
//
// Why: on CPUs without native bf16 matmul (AVX2-only machines) oneDNN's bf16 GEMM runs at ~20 GFLOP/s at every M,
// so the expert GEMMs, which have few rows each, cost several times their memory floor. Here weights are read once
// in their storage dtype (bf16 / fp16 / fp32) and widened to fp32 on the way. By rows per expert (M):
//   M <= 4: stream4 / stream_split read each weight once, straight from memory (bandwidth-bound: decode);
//   M < 768: xt_block multiplies tiles of weight rows with 16 rows of x at a time (compute-bound): bf16 weights
//            4 rows at a time, read in place (xt_pair_block); fp16 widened 6 rows at a time into an L1 buffer; fp32
//            used in place. Each tile prefetches the next one's weights while it computes;
//   larger: the whole weight is widened once and MKL's sgemm takes it.
// On CPUs with native bf16 arithmetic the kernels above, fp32 FMAs on AVX2 registers, are compute-bound once a job
// has a few rows. There, with bf16 activations: jobs of 2+ rows take a vdpbf16ps kernel on the weights in place
// (bf16_dot.h, AVX-512 BF16 builds), and jobs from native_bf16_rows() rows up (4 on AMX, 128 with bf16_dot.h
// otherwise) go to oneDNN's bf16 matmul (at::mm on the weights in place).
//
// Entry points: the ops moe_ffn_cpu / moe_ffn_int4_cpu (from the router's top-k; schemas in
// qwen2_moe_hf/kernels/ops.py) and the pybind moe_layer (the whole layer, router included, for the cpu backend's
// fused lane). Contracts:
//   moe_ffn_cpu(x [T,H], topk_ids [T,k] int64, topk_weights [T,k], w_gate E x [I,H], w_up E x [I,H],
//               w_down E x [H,I], shared_gate [S,H]?, shared_up [S,H]?, shared_down [H,S]?,
//               shared_expert_gate [1,H]?) -> [T,H]
//   The experts' weights come as lists of the per-expert tensors the model already holds (the hub's layout), so
//   nothing is restacked or copied.
//   moe_ffn_int4_cpu(x, topk_ids, topk_weights, experts: 12 per expert (qweight, qzeros, scales, g_idx of gate,
//                    up, down), shared: 12 or none, shared_expert_gate?, zero_offset) -> [T,H]: the same layer with
//                    GPTQ 4-bit experts, computed by int4_gemm.h on the packed tensors.
//   out[t] = sum_j topk_weights[t,j] * expert_{ids[t,j]}(x[t]) + sigmoid(x[t] . g) * shared(x[t]),
//   expert(x) = W_down (silu(W_gate x) * (W_up x)). Accumulation is fp32; the result has x's dtype.
//   moe_layer(x [..., H], router_weight [E, H], top_k, renormalize, LayerPack, shared_expert_gate?)
//       -> (out [..., H], router logits [tokens, E]): logits = x . router_weight (fp32 sums, rounded to x's dtype),
//       routed as routing.h (route()'s definition), then the layer as above.
//   Deterministic: every sum runs in a fixed order, whatever the thread count.
// The module also holds IdentityWatch (identity_watch.h): the prepared weights' per-call freshness check.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "identity_watch.h"
#include "int4_gemm.h"
#include "bf16_dot.h"
#include "decode_ops.h"
#include "native_bf16.h"
#include "routing.h"
#include "vec.h"

namespace {

using namespace qmoe;

using at::BFloat16;
using at::Half;

const at::Device kCpu(at::kCPU);

// Rows per job from which widening the whole weight to fp32 and calling MKL's sgemm beats xt_block (measured at
// the real shape, 2 threads: xt_block won up to 512 rows, bf16 and fp32 alike; sgemm at 1024). Below that, MKL's
// small-M sgemm runs at 30-55 GFLOP/s here against ~100 per core for xt_block.
constexpr int64_t kSgemmRows = 768;
// Rows per job up to which weights are streamed (each 4-row tile read once per pair of rows) rather than widened.
constexpr int64_t kStreamRows = 4;
// Output rows per parallel work item (64 rows x K=2048 bf16 = 256 KiB of weights).
constexpr int64_t kTileN = 64;
// The same for one row of x on the AVX-512 lanes kernel (lane_rows), in kTileLanes regions of 128 rows: 4 streams
// per thread, as for lm_head. 256 rows in 8 regions (before 2026-12-05 night) read 5-7% slower in the VM's fast
// memory phase (the block at 1 token, 1 MB items in 8 streams), 1-2% in its slow one (docs/benchmarks.md).
constexpr int64_t kLaneTileN = 512;
constexpr int kTileLanes = 4;
// Rows per job from which bf16 weights meeting bf16 activations take bf16_dot_rows (AVX-512 BF16 builds; one row
// stays on the lanes kernel). From 2 rather than 5: the bf16 block at 4 / 16 tokens 10.2 -> 8.0 / 25.6 -> 21.6 ms.
constexpr int64_t kDotMinRows = 2;



#ifdef QMOE_AVX2
// Streams weight rows from memory for the 1-2 rows of x that decode gives each expert: every weight element is
// loaded once and widened to fp32 in registers. Bandwidth-bound by design. (Software prefetch measured ~5% slower
// than the hardware prefetcher alone here.)
template <typename T, int ROWS>
QMOE_KERNEL void stream4(const float* x, int64_t K, const T* w0, int64_t n, float* y, int64_t ldy) {
  const T* w1 = w0 + K;
  const T* w2 = w1 + K;
  const T* w3 = w2 + K;
  const int64_t K8 = K - K % 8;
  __m256 acc[ROWS][4];
  QMOE_UNROLL
  for (int r = 0; r < ROWS; ++r)
    QMOE_UNROLL
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 v[4] = {load8(w0 + k), load8(w1 + k), load8(w2 + k), load8(w3 + k)};
    QMOE_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      const __m256 a = _mm256_loadu_ps(x + r * K + k);
      QMOE_UNROLL
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(a, v[j], acc[r][j]);
    }
  }
  const T* ws[4] = {w0, w1, w2, w3};
  QMOE_UNROLL
  for (int r = 0; r < ROWS; ++r)
    QMOE_UNROLL
    for (int j = 0; j < 4; ++j) {
      float sum = hsum(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) sum += x[r * K + k] * to_float(ws[j][k]);
      y[r * ldy + n + j] = sum;
    }
}

// The same for bf16 weights with half the widening work: one 32-byte load holds 16 weights as 8 pairs; shifting
// each 32-bit pair left by 16 gives the even weights as fp32, masking off its low half gives the odd ones. x comes
// "split" (split16 below) so that its even and odd elements line up with them. NW weight rows per pass.
template <int ROWS, int NW>
QMOE_KERNEL void stream_split(const float* xs, int64_t K, const BFloat16* w0, int64_t n, float* y, int64_t ldy) {
  const BFloat16* ws[NW];
  QMOE_UNROLL
  for (int j = 0; j < NW; ++j) ws[j] = w0 + j * K;
  const int64_t K16 = K - K % 16;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[ROWS][NW];
  QMOE_UNROLL
  for (int r = 0; r < ROWS; ++r)
    QMOE_UNROLL
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    // One weight row at a time: ROWS x NW accumulators + 2 x ROWS x vectors + the mask + 2 temporaries fit in
    // AVX2's 16 registers for (1, 8) and (2, 4) (widening all rows first did not, and spilled).
    __m256 xe[ROWS], xo[ROWS];
    QMOE_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      xe[r] = _mm256_loadu_ps(xs + r * K + k);
      xo[r] = _mm256_loadu_ps(xs + r * K + k + 8);
    }
    QMOE_UNROLL
    for (int j = 0; j < NW; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws[j] + k));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      QMOE_UNROLL
      for (int r = 0; r < ROWS; ++r) acc[r][j] = _mm256_fmadd_ps(xo[r], odd, _mm256_fmadd_ps(xe[r], even, acc[r][j]));
    }
  }
  QMOE_UNROLL
  for (int r = 0; r < ROWS; ++r)
    QMOE_UNROLL
    for (int j = 0; j < NW; ++j) {
      float sum = hsum(acc[r][j]);
      for (int64_t k = K16; k < K; ++k) sum += xs[r * K + k] * to_float(ws[j][k]);
      y[r * ldy + n + j] = sum;
    }
}

// Prefetches [p, p + bytes) spread over a loop of `chunks` steps, a few cache lines per step (step(c) at step c):
// the fetch then overlaps the loop's arithmetic.
struct SpreadPrefetch {
  const char* p;
  int64_t lines, chunks, fetched = 0;
  SpreadPrefetch(const char* p, int64_t bytes, int64_t chunks)
      : p(p), lines(p == nullptr ? 0 : (bytes + 63) / 64), chunks(chunks) {}
  void step(int64_t c) {
    for (const int64_t until = lines * (c + 1) / chunks; fetched < until; ++fetched)
      _mm_prefetch(p + fetched * 64, _MM_HINT_T0);
  }
};

// y[m * ldy + j] = lane m of acc[j] for m < rows: the x-transposed kernels' accumulators hold one x row per lane.
// All lanes go out first, then the valid rows: a lane loop with a data-dependent bound over acc itself made GCC
// keep a memory copy of every accumulator, stored on each step of the kernel's loop (half speed).
template <int NR, int MV>
inline void store_lanes(const __m256 (&acc)[NR][MV], int64_t rows, float* y, int64_t ldy) {
  alignas(32) float lanes[NR][MV * 8];
  QMOE_UNROLL
  for (int j = 0; j < NR; ++j)
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) _mm256_store_ps(&lanes[j][v * 8], acc[j][v]);
  for (int64_t m = 0; m < rows; ++m)
    QMOE_UNROLL
    for (int j = 0; j < NR; ++j) y[m * ldy + j] = lanes[j][m];
}

// For experts with several rows, x transposed: y[m, j] = sum_k buf[j * ldb + k] * xt[k, m] for one block of up
// to 16 rows of x, packed as xt [K, 16] (pack16). Each step broadcasts one widened weight and multiplies it with 8
// or 16 rows of x at once: NR x MV accumulators stay in registers for the whole K and there is no horizontal sum.
// Meanwhile it prefetches [pf, pf + pf_bytes), the next tile's weights, a few lines after every 64 steps: their
// fetch from memory then overlaps this tile's arithmetic instead of following it (the widening that reads them
// otherwise waits on memory; measured 10.5 -> 7.5 ms for the 16-row shared expert's gate on one core).
template <int NR, int MV>
QMOE_KERNEL void xt_block(const float* xt, int64_t K, const float* buf, int64_t ldb, int64_t rows, float* y,
                          int64_t ldy, const char* pf, int64_t pf_bytes) {
  __m256 acc[NR][MV];
  QMOE_UNROLL
  for (int j = 0; j < NR; ++j)
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_setzero_ps();
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  SpreadPrefetch prefetch(pf, pf_bytes, chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    prefetch.step(c);
    const int64_t k_end = std::min(K, (c + 1) * kChunk);
    for (int64_t k = c * kChunk; k < k_end; ++k) {
      __m256 xv[MV];
      QMOE_UNROLL
      for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xt + k * 16 + v * 8);
      QMOE_UNROLL
      for (int j = 0; j < NR; ++j) {
        const __m256 b = _mm256_broadcast_ss(buf + j * ldb + k);
        QMOE_UNROLL
        for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_fmadd_ps(b, xv[v], acc[j][v]);
      }
    }
  }
  store_lanes(acc, rows, y, ldy);
}

// xt_block for bf16 weights read in place, without widening them first: one 32-bit broadcast holds the pair
// (w[k], w[k+1]); shifting it left by 16 gives w[k] as fp32 in every lane, masking off its low half w[k+1]. K must be
// even. NR = 4 with MV = 2: 8 accumulators + 4 x vectors + pair, even, odd and the mask, all 16 registers (NR = 6
// spilled accumulators). On one core, the shared expert's gate at 16 rows: ~18% faster than widening first.
template <int NR, int MV>
QMOE_KERNEL void xt_pair_block(const float* xt, int64_t K, const BFloat16* w, int64_t rows, float* y, int64_t ldy,
                               const char* pf, int64_t pf_bytes) {
  __m256 acc[NR][MV];
  QMOE_UNROLL
  for (int j = 0; j < NR; ++j)
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_setzero_ps();
  const __m256 high = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  SpreadPrefetch prefetch(pf, pf_bytes, chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    prefetch.step(c);
    const int64_t k_end = std::min(K, (c + 1) * kChunk);
    for (int64_t k = c * kChunk; k < k_end; k += 2) {
      __m256 xe[MV], xo[MV];
      QMOE_UNROLL
      for (int v = 0; v < MV; ++v) {
        xe[v] = _mm256_loadu_ps(xt + k * 16 + v * 8);
        xo[v] = _mm256_loadu_ps(xt + (k + 1) * 16 + v * 8);
      }
      QMOE_UNROLL
      for (int j = 0; j < NR; ++j) {
        float bits;  // the pair as one float's bits (memcpy: w + j*K + k need not be 4-byte aligned)
        std::memcpy(&bits, w + j * K + k, sizeof(bits));
        const __m256 pair = _mm256_set1_ps(bits);
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(pair), 16));
        const __m256 odd = _mm256_and_ps(pair, high);
        QMOE_UNROLL
        for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_fmadd_ps(odd, xo[v], _mm256_fmadd_ps(even, xe[v], acc[j][v]));
      }
    }
  }
  store_lanes(acc, rows, y, ldy);
}

template <int NR>
inline void xt_pair_tile(const float* xt, int64_t M, int64_t K, const BFloat16* w, float* y, int64_t ldy,
                         const char* pf, int64_t pf_bytes) {
  for (int64_t b = 0; b * 16 < M; ++b) {
    const int64_t rows = std::min<int64_t>(16, M - b * 16);
    const char* p = b == 0 ? pf : nullptr;
    if (rows > 8) xt_pair_block<NR, 2>(xt + b * 16 * K, K, w, rows, y + b * 16 * ldy, ldy, p, pf_bytes);
    else xt_pair_block<NR, 1>(xt + b * 16 * K, K, w, rows, y + b * 16 * ldy, ldy, p, pf_bytes);
  }
}

// x rows [M, K] as xt_block reads them: blocks of 16 rows, each [K, 16] (row m of the block in lane m), the last
// block padded with zeros.
inline void pack16(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t b = 0; b * 16 < M; ++b) {
    float* blk = out + b * 16 * K;
    const int64_t rows = std::min<int64_t>(16, M - b * 16);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t m = 0; m < rows; ++m) blk[k * 16 + m] = x[(b * 16 + m) * K + k];
      for (int64_t m = rows; m < 16; ++m) blk[k * 16 + m] = 0.f;
    }
  }
}

// NR widened weight rows (buf, row stride ldb) times every 16-row block of x (xt): 16-row blocks use two vectors
// per weight, a last block of up to 8 rows one. The first block prefetches [pf, pf + pf_bytes).
template <int NR>
inline void xt_tile(const float* xt, int64_t M, int64_t K, const float* buf, int64_t ldb, float* y, int64_t ldy,
                    const char* pf, int64_t pf_bytes) {
  for (int64_t b = 0; b * 16 < M; ++b) {
    const int64_t rows = std::min<int64_t>(16, M - b * 16);
    const char* p = b == 0 ? pf : nullptr;
    if (rows > 8) xt_block<NR, 2>(xt + b * 16 * K, K, buf, ldb, rows, y + b * 16 * ldy, ldy, p, pf_bytes);
    else xt_block<NR, 1>(xt + b * 16 * K, K, buf, ldb, rows, y + b * 16 * ldy, ldy, p, pf_bytes);
  }
}

// x rows [M, K] in the order stream_split reads them: each full 16-element chunk as its 8 even then its 8 odd
// elements; a tail shorter than 16 stays as it is.
inline void split16(const float* x, int64_t M, int64_t K, float* out) {
  const int64_t K16 = K - K % 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = out + m * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        dst[k + i] = src[k + 2 * i];
        dst[k + 8 + i] = src[k + 2 * i + 1];
      }
    std::copy(src + K16, src + K, dst + K16);
  }
}

// rows x K weights to fp32, row stride ldb.
template <typename T>
inline void widen(const T* src, int64_t rows, int64_t K, float* dst, int64_t ldb) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * K;
    float* d = dst + r * ldb;
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) _mm256_storeu_ps(d + i, load8(s + i));
    for (; i < K; ++i) d[i] = to_float(s[i]);
  }
}
#endif

#ifdef QMOE_VNNI
constexpr bool kHaveRowLanes = true;
// One row of x against bf16 weights with AVX-512, lanes-wise: rows from several far-apart regions of the weight in
// each pass, one accumulator of 16 per row. Each region is one contiguous stream, and the regions sit in different
// DRAM pages, which a core's prefetchers keep in flight together. lm_head (622 MB): 4 regions per thread read at
// 1.21-1.39x the rate of stream_split's 8 adjacent rows per pass (2 threads, Zen 4; 8 or 16 regions were slower
// there); the experts' 512-row items in 4 regions of 128 rows (docs/benchmarks.md). x comes split per 32: its 16
// even then its 16 odd elements (split32), lined up with the weights' even and odd halves of each 32-bit pair.
constexpr int kRowLanes = 4;

// One pass over S weight rows: bf16 as 32 values per 64-byte load, x split32 (each value's even / odd half of a
// 32-bit pair widened by a shift or a mask); fp16 as 16 values per 32-byte load widened by vcvtph2ps, x as it is.
template <typename T, int S>
QMOE_KERNEL void stream_lanes(const float* xs, int64_t K, const T* const* w, float* const* y) {
  static_assert(std::is_same<T, BFloat16>::value || std::is_same<T, Half>::value, "bf16 or fp16 weights");
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[S];
  QMOE_UNROLL
  for (int j = 0; j < S; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512 xe = _mm512_loadu_ps(xs + k), xo = _mm512_loadu_ps(xs + k + 16);
    QMOE_UNROLL
    for (int j = 0; j < S; ++j) {
      __m512 lo, hi;
      if constexpr (std::is_same<T, BFloat16>::value) {
        const __m512i v = _mm512_loadu_si512(w[j] + k);
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        hi = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      } else {
        lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k)));
        hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k + 16)));
      }
      acc[j] = _mm512_fmadd_ps(xo, hi, _mm512_fmadd_ps(xe, lo, acc[j]));
    }
  }
  QMOE_UNROLL
  for (int j = 0; j < S; ++j) *y[j] = _mm512_reduce_add_ps(acc[j]);
}

// x [K] (a multiple of 32) as stream_lanes reads it against bf16 weights: per 32 elements, the 16 even then the 16
// odd ones.
inline void split32(const float* x, int64_t K, float* xs) {
  for (int64_t k = 0; k < K; k += 32)
    for (int i = 0; i < 16; ++i) {
      xs[k + i] = x[k + 2 * i];
      xs[k + 16 + i] = x[k + 2 * i + 1];
    }
}

// y[n] = x . w[n] for n in [n0, n1), the range cut into S regions walked in step (the last few rows one by one).
// xs: x as stream_lanes<T> reads it (bf16: split32(x)).
template <int S, typename T>
void lane_rows(const float* xs, int64_t K, const T* w, int64_t n0, int64_t n1, float* y) {
  const int64_t len = (n1 - n0) / S;
  const T* wp[S];
  float* yp[S];
  for (int64_t i = 0; i < len; ++i) {
    for (int j = 0; j < S; ++j) {
      wp[j] = w + (n0 + j * len + i) * K;
      yp[j] = y + n0 + j * len + i;
    }
    stream_lanes<T, S>(xs, K, wp, yp);
  }
  for (int64_t n = n0 + S * len; n < n1; ++n) {
    const T* w1[1] = {w + n * K};
    float* y1[1] = {y + n};
    stream_lanes<T, 1>(xs, K, w1, y1);
  }
}

// y[n] = x . w[n] for all N rows (K a multiple of 32), one large bf16 or fp16 weight (lm_head; fp16 is how the
// GPTQ checkpoints keep it): each thread takes a contiguous share of the rows in kRowLanes regions. (The experts'
// jobs take lane_rows<kTileLanes> per item in run_jobs.)
template <typename T>
void row_lanes(const float* x, int64_t K, const T* w, int64_t N, float* y) {
  std::vector<float> xs(x, x + K);
  if constexpr (std::is_same<T, BFloat16>::value) split32(x, K, xs.data());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / kRowLanes));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) lane_rows<kRowLanes>(xs.data(), K, w, N * t / threads, N * (t + 1) / threads, y);
  });
}
#else
constexpr bool kHaveRowLanes = false;
#endif

// Whether one row of x takes the lanes kernels (where compiled): row_lanes in dense_linear_cpu (bf16 and fp16
// weights), lane_rows in the experts' jobs (bf16); off for benchmarks' A/B and tests.
std::atomic<bool>& row_lanes_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

// y[m, n] = sum_k x[m, k] * w[n, k] for n in [n0, n1), all m < M. x: fp32 [M, K] (row stride K); xs: the same
// rows as the AVX2 kernels read them (split16 for bf16 with M <= kStreamRows, pack16 above; unused otherwise);
// w: [N, K] row-major; y: fp32, row stride ldy.
template <typename T>
void rows_times_weight(const float* x, const float* xs, int64_t M, int64_t K, const T* w, int64_t n0, int64_t n1,
                       float* y, int64_t ldy) {
  int64_t n = n0;
#ifdef QMOE_AVX2
  if (M <= kStreamRows) {
    if constexpr (std::is_same<T, BFloat16>::value) {
      // One row (decode): 8 weight rows per pass, 8 read streams instead of 4 (~7% faster at the real shape).
      if (M == 1)
        for (; n + 8 <= n1; n += 8) stream_split<1, 8>(xs, K, w + n * K, n, y, ldy);
    }
    // Pairs of rows per pass; after the first pass the 4-row tile is in L1/L2.
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      if constexpr (std::is_same<T, BFloat16>::value) {
        for (; m + 2 <= M; m += 2) stream_split<2, 4>(xs + m * K, K, w + n * K, n, y + m * ldy, ldy);
        if (m < M) stream_split<1, 4>(xs + m * K, K, w + n * K, n, y + m * ldy, ldy);
      } else {
        for (; m + 2 <= M; m += 2) stream4<T, 2>(x + m * K, K, w + n * K, n, y + m * ldy, ldy);
        if (m < M) stream4<T, 1>(x + m * K, K, w + n * K, n, y + m * ldy, ldy);
      }
    }
  } else if constexpr (std::is_same<T, BFloat16>::value) {
    if (K % 2 == 0) {
      // bf16 read in place, 4 weight rows per tile; the 4 rows after each tile prefetched while it computes.
      auto pf = [&](int64_t rows) -> const char* {
        return n + rows < n1 ? reinterpret_cast<const char*>(w + (n + rows) * K) : nullptr;
      };
      auto pf_bytes = [&](int64_t rows) -> int64_t {
        return std::min<int64_t>(4, n1 - n - rows) * K * static_cast<int64_t>(sizeof(T));
      };
      for (; n + 4 <= n1; n += 4) xt_pair_tile<4>(xs, M, K, w + n * K, y + n, ldy, pf(4), pf_bytes(4));
      for (; n < n1; ++n) xt_pair_tile<1>(xs, M, K, w + n * K, y + n, ldy, pf(1), pf_bytes(1));
    }
  }
  if (M > kStreamRows && n < n1) {
    // Widen 6 weight rows at a time to fp32 (fp32 weights are used in place), then xt_block over every 16-row block
    // of x: 6 weight rows x 16 x-rows = 12 accumulators + 2 x vectors + 1 broadcast, 15 of AVX2's 16 registers.
    // The widened rows are 16 floats apart beyond K: at a stride of exactly K (8 KiB at the real shape) the six
    // rows fall into the same L1 sets (measured ~8% slower).
    constexpr bool kIsFloat = std::is_same<T, float>::value;
    const int64_t ldb = kIsFloat ? K : K + 16;
    std::vector<float> buf(kIsFloat ? 0 : 6 * ldb);
    auto tile = [&](int64_t rows) -> const float* {
      if constexpr (kIsFloat) return w + n * K;
      widen(w + n * K, rows, K, buf.data(), ldb);
      return buf.data();
    };
    // While the tile at n (of `rows` rows) computes, the up to 6 rows after it are prefetched (not past n1: the
    // next item may go to the other thread).
    auto next = [&](int64_t rows) -> const char* {
      return n + rows < n1 ? reinterpret_cast<const char*>(w + (n + rows) * K) : nullptr;
    };
    auto next_bytes = [&](int64_t rows) -> int64_t {
      return std::min<int64_t>(6, n1 - n - rows) * K * static_cast<int64_t>(sizeof(T));
    };
    for (; n + 6 <= n1; n += 6) xt_tile<6>(xs, M, K, tile(6), ldb, y + n, ldy, next(6), next_bytes(6));
    for (; n + 2 <= n1; n += 2) xt_tile<2>(xs, M, K, tile(2), ldb, y + n, ldy, next(2), next_bytes(2));
    for (; n < n1; ++n) xt_tile<1>(xs, M, K, tile(1), ldb, y + n, ldy, next(1), next_bytes(1));
  }
#endif
  for (; n < n1; ++n) {  // leftover rows (and the whole job without AVX2)
    const T* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * to_float(wr[k]);
      y[m * ldy + n] = acc;
    }
  }
}

// One GEMM job: y[0:M, 0:N] (row stride ldy) = x[0:M, 0:K] @ w^T, with w [N, K] row-major in the job list's dtype.
struct Job {
  const float* x;
  int64_t M;
  const void* w;  // dense [N, K] in the job list's dtype, or null when q is set
  float* y;
  int64_t N, K, ldy;
  const Int4Weight* q = nullptr;  // a GPTQ 4-bit weight (int4_gemm.h)
};

// Runs all jobs (one weight dtype) in one parallel region over (job, tile of N): few synchronisations, and both
// threads busy even when a single expert has a token. Jobs with many rows use sgemm instead.
// native: whether bf16 jobs may go to oneDNN (the activations are bf16, so rounding x to bf16 loses nothing the
// torch path keeps).
template <typename T>
void run_jobs(const std::vector<Job>& jobs, bool native_ok) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  std::vector<const Job*> tiled;
  std::vector<int64_t> first_item{0};
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const int64_t native = std::is_same<T, BFloat16>::value && native_ok ? native_rows(NativeKind::kBf16Weights) : 0;
  for (const Job& job : jobs) {
    if (native > 0 && job.M >= native) {
      // oneDNN (AMX / AVX-512 BF16) on the weights in place.
      at::Tensor w = at::from_blob(const_cast<void*>(job.w), {job.N, job.K}, f32.dtype(at::kBFloat16));
      native_bf16_mm(job.x, job.M, job.K, w, /*transposed=*/true, job.y, job.N, job.ldy);
    } else if (job.M >= kSgemmRows) {
      // Widen the weights once (bf16/fp16), then let MKL do a proper GEMM (itself multi-threaded).
      at::Tensor w32;
      if (kIsFloat) {
        w32 = at::from_blob(const_cast<void*>(job.w), {job.N, job.K}, f32);
      } else {
        w32 = at::empty({job.N, job.K}, f32);
        const T* src = static_cast<const T*>(job.w);
        float* dst = w32.data_ptr<float>();
        at::parallel_for(0, job.N * job.K, 1 << 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) dst[i] = to_float(src[i]);
        });
      }
      at::Tensor xm = at::from_blob(const_cast<float*>(job.x), {job.M, job.K}, f32);
      at::Tensor ym = at::from_blob(job.y, {job.M, job.N}, {job.ldy, 1}, f32);
      at::mm_out(ym, xm, w32.t());
    } else if (job.M > 0) {
      tiled.push_back(&job);
    }
  }
  std::stable_sort(tiled.begin(), tiled.end(),
                   [](const Job* a, const Job* b) { return a->M * a->K > b->M * b->K; });
#ifdef QMOE_BF16_DOT
  // bf16 weights meeting bf16 activations from kDotMinRows rows go to bf16_dot_rows (AVX-512 BF16 builds).
  auto dot = [&](const Job& job) {
    return std::is_same<T, BFloat16>::value && native_ok && job.M >= kDotMinRows && bf16_dot_enabled().load();
  };
#endif
  // One bf16 row with K a multiple of 32 goes to lane_rows in items of kLaneTileN rows (AVX-512 builds).
  auto lanes = [&](const Job& job) {
#ifdef QMOE_VNNI
    return std::is_same<T, BFloat16>::value && job.M == 1 && job.K % 32 == 0 && row_lanes_enabled().load();
#else
    (void)job;
    return false;
#endif
  };
  std::vector<int64_t> tile_n;
  for (const Job* job : tiled) {
    tile_n.push_back(lanes(*job) ? kLaneTileN : kTileN);
    first_item.push_back(first_item.back() + (job->N + tile_n.back() - 1) / tile_n.back());
  }
  // x rows in the layout the kernels read: split32 for lane_rows, split16 for stream_split (bf16, few rows),
  // pack16 for xt_block (more rows), rounded to bf16 for bf16_dot_rows (exact for the layer's input; the down
  // projection's input is rounded as the torch path rounds it); one copy per distinct x and kind, as gate and up
  // share theirs. Small next to the weights.
  std::vector<const float*> x_prep(tiled.size(), nullptr);
  std::vector<const BFloat16*> x_bf16(tiled.size(), nullptr);
#ifdef QMOE_AVX2
  std::vector<std::vector<float>> x_prep_store;
  std::vector<std::pair<const float*, const float*>> done;  // (x, its prepared copy)
  // done's entry for x, else make()'s, recorded.
  auto once = [](auto& done_list, const float* x, auto make) {
    for (const auto& d : done_list) {
      if (d.first == x) return d.second;
    }
    done_list.emplace_back(x, make());
    return done_list.back().second;
  };
#ifdef QMOE_BF16_DOT
  std::vector<std::vector<BFloat16>> x_bf16_store;
  std::vector<std::pair<const float*, const BFloat16*>> done_bf16;
#endif
  for (size_t j = 0; j < tiled.size(); ++j) {
    const Job& job = *tiled[j];
#ifdef QMOE_BF16_DOT
    if (dot(job)) {
      x_bf16[j] = once(done_bf16, job.x, [&] {
        x_bf16_store.emplace_back(job.M * job.K);
        round_to_bf16(job.x, job.M * job.K, x_bf16_store.back().data());
        return static_cast<const BFloat16*>(x_bf16_store.back().data());
      });
      continue;
    }
#endif
    const bool split = job.M <= kStreamRows && std::is_same<T, BFloat16>::value;
    if (job.M <= kStreamRows && !split) continue;
    x_prep[j] = once(done, job.x, [&] {
#ifdef QMOE_VNNI
      if (lanes(job)) {
        x_prep_store.emplace_back(job.K);
        split32(job.x, job.K, x_prep_store.back().data());
      } else
#endif
      if (split) {
        x_prep_store.emplace_back(job.M * job.K);
        split16(job.x, job.M, job.K, x_prep_store.back().data());
      } else {
        x_prep_store.emplace_back((job.M + 15) / 16 * 16 * job.K);
        pack16(job.x, job.M, job.K, x_prep_store.back().data());
      }
      return static_cast<const float*>(x_prep_store.back().data());
    });
  }
#endif
  // Items are handed out one at a time from a shared counter: their costs differ by up to ~20x (a 16-row tile
  // of the shared expert against a 1-row tile of a routed one), so a static split leaves one thread idle.
  // Costliest jobs first, so that the last items handed out are short. The schedule does not change any result:
  // each output element is computed by exactly one item.
  const int64_t items = first_item.back();
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    size_t j = 0;
    for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
      if (item < first_item[j] || item >= first_item[j + 1])
        j = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      const Job& job = *tiled[j];
      const int64_t n0 = (item - first_item[j]) * tile_n[j];
      const int64_t n1 = std::min(job.N, n0 + tile_n[j]);
#ifdef QMOE_BF16_DOT
      if constexpr (std::is_same<T, BFloat16>::value) {
        if (x_bf16[j] != nullptr) {
          bf16_dot_rows(x_bf16[j], job.M, job.K, static_cast<const T*>(job.w), job.N, n0, n1, job.y, job.ldy);
          continue;
        }
      }
#endif
#ifdef QMOE_VNNI
      if constexpr (std::is_same<T, BFloat16>::value) {
        if (tile_n[j] == kLaneTileN) {
          lane_rows<kTileLanes>(x_prep[j], job.K, static_cast<const T*>(job.w), n0, n1, job.y);
          continue;
        }
      }
#endif
      rows_times_weight(job.x, x_prep[j], job.M, job.K, static_cast<const T*>(job.w), n0, n1, job.y, job.ldy);
    }
  });
}

// Whether a decode step's one-row int4 jobs run in one parallel region (run_int4_jobs); off for A/B and tests.
std::atomic<bool>& int4_jobs_together() {
  static std::atomic<bool> on{true};
  return on;
}

// Int4 jobs, each split into one contiguous column slice per thread (int4_matmul's): every thread then walks the
// longest possible row segments of qweight, and both threads stream the same weight at once. A decode step's
// one-row jobs run so in one region (int4_rows_each_sliced, int4_gemm.h); jobs of more rows
// one region each. Measured slower for a decode step: one region over 64-column tiles of all jobs, as run_jobs
// does (5.0 vs 3.4 ms: shorter segments, threads on different matrices), and one region with a contiguous slice
// of all the jobs' columns per thread, as gptq_linears_cpu runs q, k, v (int4_rows_one_region: threads on
// different matrices; tree A/B, 3 pairs: the int4 block at 1 token 1.44 -> 1.64 ms).
void run_int4_jobs(const std::vector<const Job*>& jobs, Int4Act act) {
  bool together = jobs.size() > 1 && int4_jobs_together().load();
  for (const Job* job : jobs) together = together && job->M == 1 && int4_row_in_region(*job->q, act);
  if (!together) {
    for (const Job* job : jobs) int4_matmul(*job->q, job->x, job->M, job->y, job->ldy, act);
    return;
  }
  std::vector<Int4RowJob> rows;
  for (const Job* job : jobs) rows.push_back({job->q, job->x, job->y});
  int4_rows_each_sliced(rows);
}

// x_dtype: the layer's activations' dtype; only bf16 activations may take oneDNN's bf16 matmul (native_bf16.h),
// 16-bit ones the int4 VNNI path (int4_path).
void run_jobs_any(at::ScalarType dtype, const std::vector<Job>& jobs, at::ScalarType x_dtype) {
  const bool native_ok = x_dtype == at::kBFloat16;
  std::vector<const Job*> int4;
  std::vector<Job> dense;
  for (const Job& job : jobs) {
    if (job.M == 0) continue;
    if (job.q != nullptr) int4.push_back(&job); else dense.push_back(job);
  }
  if (!int4.empty()) run_int4_jobs(int4, int4_act(x_dtype));
  if (dense.empty()) return;
  switch (dtype) {
    case at::kFloat: return run_jobs<float>(dense, native_ok);
    case at::kBFloat16: return run_jobs<BFloat16>(dense, native_ok);
    case at::kHalf: return run_jobs<Half>(dense, native_ok);
    default: TORCH_CHECK(false, "moe_ffn_cpu: weights must be float32, bfloat16 or float16, got ", dtype);
  }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// act[r, i] = silu(gu[r, i]) * gu[r, I + i] for rows [0, R). Split over elements, not rows, so that both threads
// share even the one row of a decode step.
void silu_mul(const float* gu, int64_t R, int64_t I, float* act) {
  at::parallel_for(0, R * I, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin / I; r * I < end; ++r) {
      const float* g = gu + r * 2 * I;
      const float* u = g + I;
      float* a = act + r * I;
      int64_t i = std::max<int64_t>(begin - r * I, 0);
      const int64_t stop = std::min<int64_t>(end - r * I, I);
#ifdef QMOE_AVX2
      for (; i + 8 <= stop; i += 8)
        _mm256_storeu_ps(a + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
#endif
      for (; i < stop; ++i) a[i] = silu(g[i]) * u[i];
    }
  });
}

// What one MoE layer's GEMMs read: the weight of expert e's gate (0), up (1) or down (2) projection, and of the
// shared expert's. `set` fills a Job's weight (dense pointer or int4); it is only asked for experts with tokens.
struct LayerWeights {
  int64_t E = 0, I = 0, S = 0;  // S = 0: no shared expert
  at::ScalarType dense_dtype = at::kFloat;
  std::function<void(Job&, int64_t e, int which)> expert;
  std::function<void(Job&, int which)> shared;
  c10::optional<at::Tensor> shared_expert_gate;
};

// v rounded to `dtype` (float32, bfloat16 or float16) and back, as Tensor.to(dtype) rounds.
inline float round_to(float v, at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return static_cast<float>(static_cast<BFloat16>(v));
  if (dtype == at::kHalf) return static_cast<float>(static_cast<Half>(v));
  return v;
}

// Each (token, slot)'s expert and weight (fp32), slot-major: ids[t * k + j].
struct Routing {
  int64_t k = 0;
  std::vector<int64_t> ids;
  std::vector<float> weights;
};

Routing routing_from_topk(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t T, int64_t E,
                          const char* op) {
  const at::Tensor ids = TensorArg(topk_ids, op, "topk_ids", kCpu).dtype(at::kLong).sizes({T, -1}, "x").contiguous();
  Routing r;
  r.k = ids.size(1);
  TensorArg(topk_weights, op, "topk_weights", kCpu).floating().sizes({T, r.k}, "topk_ids");
  const int64_t slots = checked_mul(T, r.k, op, "tokens * k");
  r.ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + slots);
  for (int64_t id : r.ids) TORCH_CHECK(id >= 0 && id < E, op, ": expert id ", id, " out of range [0, ", E, ")");
  r.weights.resize(slots);
  read_floats(topk_weights, r.weights.data(), op, "topk_weights");
  return r;
}

// The router after its logits, as qwen2_moe_hf.moe.routing.route defines it (routing.h), the weights rounded to the
// logits' dtype as route() returns them.
Routing routing_from_logits(const at::Tensor& logits, int64_t top_k, bool renormalize, int64_t T, int64_t E,
                            const char* op) {
  TensorArg(logits, op, "router_logits", kCpu).floating().sizes({T, E}, "x and the experts");
  check_range(top_k, 1, E, op, "top_k");
  Routing r;
  r.k = top_k;
  r.ids.resize(checked_mul(T, top_k, op, "tokens * top_k"));
  r.weights.resize(r.ids.size());
  std::vector<float> l(T * E), p(E);
  std::vector<char> taken(E);
  read_floats(logits, l.data(), op, "router_logits");
  for (int64_t t = 0; t < T; ++t) {
    route_row(l.data() + t * E, E, top_k, renormalize, r.ids.data() + t * top_k, r.weights.data() + t * top_k, p,
              taken);
    for (int64_t j = 0; j < top_k; ++j) r.weights[t * top_k + j] = round_to(r.weights[t * top_k + j],
                                                                            logits.scalar_type());
  }
  return r;
}

// The layers' fp32 intermediates, kept between calls: a fresh allocation of this size (55 MB at 256 tokens of the
// real shape) comes from mmap and is zeroed page by page on first touch, which cost 12% of a bf16 block at 256
// tokens (117.7 -> 102.6 ms with the memory reused). One buffer is kept, up to kKeepWorkspaceBytes; a call that
// finds it taken (another thread's layer) or needs more than that allocates its own.
constexpr size_t kKeepWorkspaceBytes = size_t(256) << 20;

struct KeptWorkspace {
  std::mutex mutex;
  std::unique_ptr<float[]> buffer;  // guarded by mutex; null while a call holds it
  size_t floats = 0;
};

KeptWorkspace& kept_workspace() {
  static KeptWorkspace kept;
  return kept;
}

// `floats` floats for one call, from the kept buffer when free and large enough (else new); handed back on
// destruction, kept if not larger than kKeepWorkspaceBytes.
class Workspace {
 public:
  Workspace(size_t floats, const char* op) {
    KeptWorkspace& kept = kept_workspace();
    {
      std::lock_guard<std::mutex> lock(kept.mutex);
      if (kept.buffer && kept.floats >= floats) {
        buffer_ = std::move(kept.buffer);
        floats_ = kept.floats;
        return;
      }
    }
    buffer_.reset(new (std::nothrow) float[floats]);
    TORCH_CHECK(buffer_ != nullptr, op, ": cannot allocate its workspace (", floats * sizeof(float), " bytes)");
    floats_ = floats;
  }
  ~Workspace() {
    if (floats_ * sizeof(float) > kKeepWorkspaceBytes) return;
    KeptWorkspace& kept = kept_workspace();
    std::lock_guard<std::mutex> lock(kept.mutex);
    if (!kept.buffer || kept.floats < floats_) {  // keep the larger one
      kept.buffer = std::move(buffer_);
      kept.floats = floats_;
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* data() const { return buffer_.get(); }

 private:
  std::unique_ptr<float[]> buffer_;
  size_t floats_ = 0;
};

// Bytes the kept workspace holds now (tests), and letting it go (release_workspace in the module).
size_t kept_workspace_bytes() {
  KeptWorkspace& kept = kept_workspace();
  std::lock_guard<std::mutex> lock(kept.mutex);
  return kept.buffer ? kept.floats * sizeof(float) : 0;
}

void release_kept_workspace() {
  KeptWorkspace& kept = kept_workspace();
  std::lock_guard<std::mutex> lock(kept.mutex);
  kept.buffer.reset();
  kept.floats = 0;
}

// The layer after its router: align (token, slot) pairs by expert, GEMM1 (gate, up) -> SiLU*up -> GEMM2, then
// combine each token's k slots in order plus the gated shared expert. Weights come through `lw`. Every fp32
// intermediate lives in one workspace allocation.
at::Tensor moe_ffn_core(const at::Tensor& x, const Routing& routing, const LayerWeights& lw, const char* op) {
  const int64_t T = x.size(0), H = x.size(1), k = routing.k, E = lw.E, I = lw.I, S = lw.S;
  const int64_t P = checked_mul(T, k, op, "tokens * k");
  const int64_t* id = routing.ids.data();

  // Align: (token, slot) pairs sorted by expert, tokens ascending within an expert (a stable counting sort).
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t i = 0; i < P; ++i) offsets[id[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> pair_of_slot(P), cursor(offsets.begin(), offsets.end() - 1);
  std::vector<int64_t> token_of_pair(P);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t p = cursor[id[i]]++;
    pair_of_slot[i] = p;
    token_of_pair[p] = i / k;
  }

  // Workspace: x (fp32), its rows gathered by expert, gate|up, silu*up and the experts' outputs; for the shared
  // expert its gate|up, silu*up, output and gate value. Each part starts on a 64-byte boundary.
  auto round16 = [](int64_t n) { return (n + 15) / 16 * 16; };
  auto mul = [&](int64_t a, int64_t b) { return checked_mul(a, b, op, "workspace size"); };
  const int64_t sizes[] = {mul(T, H), mul(P, H), mul(P, mul(2, I)), mul(P, I), mul(P, H), mul(T, mul(2, S)),
                           mul(T, S), mul(T, H), S > 0 ? T : 0};
  int64_t total = 0;
  for (int64_t n : sizes) total = checked_add(total, checked_add(n, 15, op, "workspace size"), op, "workspace size");
  Workspace workspace(static_cast<size_t>(total + 16), op);
  float* part[9];
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace.data());
  float* cur = reinterpret_cast<float*>((base + 63) & ~uintptr_t(63));
  for (int i = 0; i < 9; ++i) {
    part[i] = cur;
    cur += round16(sizes[i]);
  }
  float *xf = part[0], *xs = part[1], *gu = part[2], *act = part[3], *ys = part[4];
  float *sgu = part[5], *sact = part[6], *shared_out = part[7], *shared_scale = part[8];
  read_floats(x, xf, op, "x");
  at::parallel_for(0, P, 64, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) std::copy(xf + token_of_pair[p] * H, xf + (token_of_pair[p] + 1) * H, xs + p * H);
  });

  // GEMM1: gate and up of every routed expert, and of the shared expert, in one parallel region.
  std::vector<Job> gemm1, gemm2;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t M = offsets[e + 1] - offsets[e];
    if (M == 0) continue;
    const float* xe = T == 1 ? xf : xs + offsets[e] * H;  // one token: every expert's x is x (the same planes)
    float* gue = gu + offsets[e] * 2 * I;
    Job g{xe, M, nullptr, gue, I, H, 2 * I}, u{xe, M, nullptr, gue + I, I, H, 2 * I};
    Job d{act + offsets[e] * I, M, nullptr, ys + offsets[e] * H, H, I, H};
    lw.expert(g, e, 0);
    lw.expert(u, e, 1);
    lw.expert(d, e, 2);
    gemm1.push_back(g);
    gemm1.push_back(u);
    gemm2.push_back(d);
  }
  if (S > 0) {
    TORCH_CHECK(lw.shared_expert_gate.has_value() && lw.shared_expert_gate->defined(), op,
                ": the shared expert needs shared_expert_gate");
    TensorArg(*lw.shared_expert_gate, op, "shared_expert_gate", kCpu).floating().numel(H, "x");
    Job g{xf, T, nullptr, sgu, S, H, 2 * S}, u{xf, T, nullptr, sgu + S, S, H, 2 * S};
    Job d{sact, T, nullptr, shared_out, H, S, H};
    lw.shared(g, 0);
    lw.shared(u, 1);
    lw.shared(d, 2);
    gemm1.push_back(g);
    gemm1.push_back(u);
    gemm2.push_back(d);
    std::vector<float> gate_w(H);
    read_floats(*lw.shared_expert_gate, gate_w.data(), op, "shared_expert_gate");
    for (int64_t t = 0; t < T; ++t) {
      float dot = 0.f;
      for (int64_t h = 0; h < H; ++h) dot += xf[t * H + h] * gate_w[h];
      shared_scale[t] = 1.f / (1.f + std::exp(-dot));
    }
  }
  run_jobs_any(lw.dense_dtype, gemm1, x.scalar_type());
  silu_mul(gu, P, I, act);
  if (S > 0) silu_mul(sgu, T, S, sact);
  run_jobs_any(lw.dense_dtype, gemm2, x.scalar_type());

  // Combine: per token, its k slots in order, then the gated shared expert; rounded once to x's dtype.
  at::Tensor out = at::empty({T, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType out_type = x.scalar_type();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(out_type == at::kFloat ? 0 : H);
    for (int64_t t = b; t < e; ++t) {
      float* o = out_type == at::kFloat ? out.data_ptr<float>() + t * H : row.data();
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = routing.weights[t * k + j];
        const float* y = ys + pair_of_slot[t * k + j] * H;
        for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
      }
      if (S > 0) {
        const float s = shared_scale[t];
        for (int64_t h = 0; h < H; ++h) o[h] += s * shared_out[t * H + h];
      }
      if (out_type == at::kBFloat16) {
        BFloat16* dst = out.data_ptr<BFloat16>() + t * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<BFloat16>(o[h]);
      } else if (out_type == at::kHalf) {
        Half* dst = out.data_ptr<Half>() + t * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<Half>(o[h]);
      }
    }
  });
  return out;
}

// The layer's dense (bf16 / fp16 / fp32) weights, checked, as the LayerWeights that `body` runs the layer with.
template <typename F>
at::Tensor with_dense_weights(const at::Tensor& x, at::TensorList w_gate, at::TensorList w_up, at::TensorList w_down,
                              const c10::optional<at::Tensor>& shared_gate,
                              const c10::optional<at::Tensor>& shared_up,
                              const c10::optional<at::Tensor>& shared_down,
                              const c10::optional<at::Tensor>& shared_expert_gate, const char* op, F&& body) {
  TensorArg(x, op, "x", kCpu).floating().dim(2);
  const int64_t H = x.size(1);
  const int64_t E = static_cast<int64_t>(w_gate.size());
  TORCH_CHECK(E > 0 && w_up.size() == w_gate.size() && w_down.size() == w_gate.size(), op,
              ": need one gate, up and down weight per expert (got ", w_gate.size(), ", ", w_up.size(), ", ",
              w_down.size(), ")");
  TensorArg(w_gate[0], op, "expert 0 gate weight", kCpu).floating().dim(2);
  TORCH_CHECK(w_gate[0].size(1) == H, op, ": x has hidden size ", H, ", expert 0 gate weight has shape ",
              w_gate[0].sizes(), " (x and the experts must agree)");
  const int64_t I = w_gate[0].size(0);
  const at::ScalarType wdt = w_gate[0].scalar_type();
  LayerWeights lw;
  lw.E = E;
  lw.I = I;
  lw.dense_dtype = wdt;
  // Each expert's weights are checked when it has tokens, just before they are read: a decode step then touches
  // 4 experts' tensors, not 60 (cold, each costs a few cache misses). A weight that is not contiguous is read
  // from a contiguous copy kept here for the call.
  static const char* names[3] = {"gate", "up", "down"};
  std::vector<at::Tensor> keep;
  lw.expert = [&](Job& job, int64_t e, int which) {
    const int64_t rows = which == 2 ? H : I, cols = which == 2 ? I : H;
    keep.push_back(TensorArg((which == 0 ? w_gate : which == 1 ? w_up : w_down)[e], op,
                             "expert " + std::to_string(e) + " " + names[which] + " weight", kCpu)
                       .dtype(wdt).sizes({rows, cols}, "x and expert 0 gate weight").contiguous());
    job.w = keep.back().data_ptr();
  };
  at::Tensor shared[3];
  if (shared_gate.has_value() && shared_gate->defined()) {
    TORCH_CHECK(shared_up.has_value() && shared_up->defined() && shared_down.has_value() && shared_down->defined(),
                op, ": the shared expert needs gate, up and down weights");
    shared[0] = TensorArg(*shared_gate, op, "shared expert gate weight", kCpu).dtype(wdt)
                    .sizes({-1, H}, "x").contiguous();
    lw.S = shared[0].size(0);
    shared[1] = TensorArg(*shared_up, op, "shared expert up weight", kCpu).dtype(wdt)
                    .sizes({lw.S, H}, "x and the shared expert gate weight").contiguous();
    shared[2] = TensorArg(*shared_down, op, "shared expert down weight", kCpu).dtype(wdt)
                    .sizes({H, lw.S}, "x and the shared expert gate weight").contiguous();
    lw.shared = [&](Job& job, int which) { job.w = shared[which].data_ptr(); };
    lw.shared_expert_gate = shared_expert_gate;
  }
  return body(lw);
}

at::Tensor moe_ffn_cpu(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       at::TensorList w_gate, at::TensorList w_up, at::TensorList w_down,
                       const c10::optional<at::Tensor>& shared_gate, const c10::optional<at::Tensor>& shared_up,
                       const c10::optional<at::Tensor>& shared_down,
                       const c10::optional<at::Tensor>& shared_expert_gate) {
  const char* op = "moe_ffn_cpu";
  return with_dense_weights(x, w_gate, w_up, w_down, shared_gate, shared_up, shared_down, shared_expert_gate, op,
                            [&](const LayerWeights& lw) {
                              return moe_ffn_core(x, routing_from_topk(topk_ids, topk_weights, x.size(0), lw.E, op),
                                                  lw, op);
                            });
}

// One dense Linear for the few rows of a decode step: y = x @ W^T (+ bias) with W [N, K] in float32 / bfloat16 /
// float16 read once, in place, by the experts' kernels (run_jobs: tiles of 64 weight rows handed out to
// both threads), sums in fp32, rounded once to x's dtype as a Linear's output is. For lm_head (151,936 x 2048) and
// the attention projections of an unquantized model, where oneDNN's GEMV read bf16 weights well below the memory
// rate here (docs/benchmarks.md). Any rows work; the model sends only up to kStreamRows.
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "dense_linear_cpu";
  TensorArg(x, op, "x", kCpu).floating().dim(2);
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor w = TensorArg(weight, op, "weight", kCpu).floating().dim(2).sizes({-1, K}, "x").contiguous();
  const int64_t N = w.size(0);
  // Every element is written by the kernels; only an empty sum (K = 0) needs zeros.
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = K > 0 ? at::empty({M, N}, f32) : at::zeros({M, N}, f32);
  if (M > 0 && N > 0 && K > 0) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
#ifdef QMOE_VNNI
    const bool lanes_ok = M == 1 && K % 32 == 0 && row_lanes_enabled().load();
    if (lanes_ok && w.scalar_type() == at::kBFloat16) {
      row_lanes(xf.data_ptr<float>(), K, static_cast<const BFloat16*>(w.data_ptr()), N, y.data_ptr<float>());
    } else if (lanes_ok && w.scalar_type() == at::kHalf) {
      row_lanes(xf.data_ptr<float>(), K, static_cast<const Half*>(w.data_ptr()), N, y.data_ptr<float>());
    } else
#endif
    {
      const std::vector<Job> jobs{Job{xf.data_ptr<float>(), M, w.data_ptr(), y.data_ptr<float>(), N, K, N}};
      run_jobs_any(w.scalar_type(), jobs, x.scalar_type());
    }
  }
  if (bias.has_value() && bias->defined()) {
    TensorArg(*bias, op, "bias", kCpu).floating().sizes({N}, "weight");
    y.add_(bias->to(at::kFloat));
  }
  return y.to(x.scalar_type());
}

// The same layer with GPTQ 4-bit experts: `experts` holds 12 tensors per expert, (qweight, qzeros, scales,
// g_idx) for gate, up, down; `shared` the same 12 for the shared expert, or nothing.
template <typename F>
at::Tensor with_int4_weights(const at::Tensor& x, at::TensorList experts, at::TensorList shared,
                             const c10::optional<at::Tensor>& shared_expert_gate, int64_t zero_offset, const char* op,
                             F&& body, Int4WeightCache* cache = nullptr) {
  TORCH_CHECK(!experts.empty() && experts.size() % 12 == 0, op, ": experts must hold 12 tensors "
              "(qweight, qzeros, scales, g_idx for gate, up, down) per expert, got ", experts.size());
  TORCH_CHECK(shared.empty() || shared.size() == 12, op, ": shared must hold 12 tensors or none, got ",
              shared.size());
  TensorArg(x, op, "x", kCpu).floating().dim(2);
  const int64_t H = x.size(1);
  LayerWeights lw;
  lw.E = static_cast<int64_t>(experts.size()) / 12;
  // Sizes from expert 0's gate qweight, [H/8, I] or blocked [I/64, H/8, 64] (each weight is checked in full when a
  // job prepares it).
  const auto [inputs, intermediate] = Int4Weight::sizes_of(experts[0], std::string(op) + ": expert 0 gate_proj");
  TORCH_CHECK(inputs == H, op, ": x has hidden size ", H, ", expert 0 gate_proj: qweight has shape ",
              experts[0].sizes(), " (", inputs, " inputs; x and the experts must agree)");
  lw.I = intermediate;
  std::vector<std::shared_ptr<const Int4Weight>> held;  // the call's weights, alive until it returns
  held.reserve(16);
  static const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
  // The weight of `slot` from t[0..3]: kept in `cache` (a LayerPack's) between calls, else prepared for this call.
  auto weight = [&](Job& job, size_t slot, const at::Tensor* t, int64_t K, int64_t N, auto&& who) {
    std::shared_ptr<const Int4Weight> w = kept_or_prepared(
        cache, slot, t, [&](Int4Weight& iw) { iw.prepare(t[0], t[1], t[2], t[3], zero_offset, who()); });
    TORCH_CHECK(w->K == K && w->N == N, who(), ": qweight holds a ", w->K, " -> ", w->N, " Linear, expected ", K,
                " -> ", N, " to match x and expert 0 gate_proj: qweight");
    job.q = w.get();
    held.push_back(std::move(w));
  };
  lw.expert = [&](Job& job, int64_t e, int which) {
    const int64_t K = which == 2 ? lw.I : H, N = which == 2 ? H : lw.I;
    weight(job, 3 * e + which, experts.data() + 12 * e + 4 * which, K, N, [&] {
      return std::string(op) + ": expert " + std::to_string(e) + " " + names[which];
    });
  };
  if (!shared.empty()) {
    lw.S = Int4Weight::sizes_of(shared[0], std::string(op) + ": shared expert gate_proj").second;
    lw.shared = [&](Job& job, int which) {
      const int64_t K = which == 2 ? lw.S : H, N = which == 2 ? H : lw.S;
      weight(job, 3 * lw.E + which, shared.data() + 4 * which, K, N,
             [&] { return std::string(op) + ": shared expert " + names[which]; });
    };
    lw.shared_expert_gate = shared_expert_gate;
  }
  return body(lw);
}

at::Tensor moe_ffn_int4_cpu(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                            at::TensorList experts, at::TensorList shared,
                            const c10::optional<at::Tensor>& shared_expert_gate, int64_t zero_offset) {
  const char* op = "moe_ffn_int4_cpu";
  return with_int4_weights(x, experts, shared, shared_expert_gate, zero_offset, op, [&](const LayerWeights& lw) {
    return moe_ffn_core(x, routing_from_topk(topk_ids, topk_weights, x.size(0), lw.E, op), lw, op);
  });
}

// A layer's expert weights as the model holds them, gathered once by the cpu backend (moe/backends/cpu.py), so
// that a call passes one object instead of ~180 tensors. The op still checks each tensor it reads on every call: one
// may have been changed in place (param.data = ...). tensors: dense, gate / up / down per expert then the shared
// expert's three (or none); int4, the 12 GPTQ tensors per expert then the shared expert's 12 (or none).
struct LayerPack {
  std::vector<at::Tensor> gate, up, down, shared, int4_experts, int4_shared;
  int64_t zero_offset = 0;
  bool int4 = false;
  std::unique_ptr<Int4WeightCache> int4_cache;  // int4: each expert's prepared weights, kept between calls

  LayerPack(std::vector<at::Tensor> tensors, int64_t experts, bool is_int4, int64_t offset)
      : zero_offset(offset), int4(is_int4) {
    const int64_t per = is_int4 ? 12 : 3;
    const int64_t n = static_cast<int64_t>(tensors.size());
    check_range(experts, 1, n, "LayerPack", "experts");
    TORCH_CHECK(n == per * experts || n == per * (experts + 1), "LayerPack: expected ", per,
                " tensors per expert for ", experts, " experts (and as many for a shared expert), got ", n);
    auto first = tensors.begin();
    if (is_int4) {
      int4_experts.assign(first, first + 12 * experts);
      int4_shared.assign(first + 12 * experts, tensors.end());
      int4_cache = std::make_unique<Int4WeightCache>(3 * (experts + 1));
      return;
    }
    for (int64_t e = 0; e < experts; ++e) {
      gate.push_back(tensors[3 * e]);
      up.push_back(tensors[3 * e + 1]);
      down.push_back(tensors[3 * e + 2]);
    }
    shared.assign(first + 3 * experts, tensors.end());
  }
};

// The layer from its router's logits (routing.h) with the weights of a LayerPack.
at::Tensor layer_from_logits(const at::Tensor& x, const at::Tensor& logits, int64_t top_k, bool renormalize,
                             const LayerPack& pack, const c10::optional<at::Tensor>& shared_expert_gate) {
  const char* op = "moe_layer";
  auto routed = [&](const LayerWeights& lw) {
    return moe_ffn_core(x, routing_from_logits(logits, top_k, renormalize, x.size(0), lw.E, op), lw, op);
  };
  if (pack.int4)
    return with_int4_weights(x, pack.int4_experts, pack.int4_shared, shared_expert_gate, pack.zero_offset, op,
                             routed, pack.int4_cache.get());
  const bool has_shared = !pack.shared.empty();
  auto shared = [&](int i) { return has_shared ? c10::optional<at::Tensor>(pack.shared[i]) : c10::nullopt; };
  return with_dense_weights(x, pack.gate, pack.up, pack.down, shared(0), shared(1), shared(2),
                            has_shared ? shared_expert_gate : c10::nullopt, op, routed);
}

// The router's logits x @ router_weight^T ([T, E], x's dtype), for moe_layer_cpu: fp32 dot products over H,
// rounded once, as a Linear layer's output is. The weight is read in its dtype (E x H, small) for every token.
template <typename T>
void router_dots(const float* xf, int64_t T_, int64_t H, const T* w, int64_t E, float* out) {
  // Over (token, expert) pairs: a decode step's 60 rows are split between threads too.
  at::parallel_for(0, T_ * E, 16, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const float* xr = xf + (i / E) * H;
      const T* wr = w + (i % E) * H;
      int64_t h = 0;
      float sum = 0.f;
#ifdef QMOE_AVX2
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; h + 16 <= H; h += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + h), load8(wr + h), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + h + 8), load8(wr + h + 8), acc1);
      }
      sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
      for (; h < H; ++h) sum += xr[h] * to_float(wr[h]);
      out[i] = sum;
    }
  });
}

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& router_weight_arg, const char* op) {
  TensorArg(x, op, "x", kCpu).floating().dim(2);
  const at::Tensor router_weight = TensorArg(router_weight_arg, op, "router_weight", kCpu)
                                       .dtype(x.scalar_type()).sizes({-1, x.size(1)}, "x").contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = router_weight.size(0);
  checked_mul(T, E, op, "tokens * experts");
  std::vector<float> xf(T * H), dots(T * E);
  read_floats(x, xf.data(), op, "x");
  switch (router_weight.scalar_type()) {
    case at::kFloat: router_dots(xf.data(), T, H, router_weight.data_ptr<float>(), E, dots.data()); break;
    case at::kBFloat16: router_dots(xf.data(), T, H, router_weight.data_ptr<BFloat16>(), E, dots.data()); break;
    case at::kHalf: router_dots(xf.data(), T, H, router_weight.data_ptr<Half>(), E, dots.data()); break;
    default: TORCH_CHECK(false, op, ": router_weight must be float32, bfloat16 or float16");
  }
  at::Tensor logits = at::empty({T, E}, x.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t i = 0; i < T * E; ++i) {
    if (x.scalar_type() == at::kBFloat16) logits.data_ptr<BFloat16>()[i] = static_cast<BFloat16>(dots[i]);
    else if (x.scalar_type() == at::kHalf) logits.data_ptr<Half>()[i] = static_cast<Half>(dots[i]);
    else logits.data_ptr<float>()[i] = dots[i];
  }
  return logits;
}

// The whole MoE layer, router included: x [..., H] -> (output [..., H], router logits [tokens, E]).
std::tuple<at::Tensor, at::Tensor> moe_layer_packed(const at::Tensor& x, const at::Tensor& router_weight,
                                                    int64_t top_k, bool renormalize, const LayerPack& pack,
                                                    const c10::optional<at::Tensor>& shared_expert_gate) {
  TensorArg(x, "moe_layer", "x", kCpu).floating();
  TORCH_CHECK(x.dim() >= 2, "moe_layer: x must be [..., tokens, hidden], got ", x.sizes());
  const at::Tensor flat = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  at::Tensor logits = router_logits(flat, router_weight, "moe_layer");
  at::Tensor out = layer_from_logits(flat, logits, top_k, renormalize, pack, shared_expert_gate);
  return {x.dim() == 2 ? out : out.view(x.sizes()), logits};
}

// One decode step of a whole decoder layer (one sequence, one new position) in one call, for the model's decode
// lane (moe/decode_layer.py): a step of the 24-layer model spends ~0.25-0.45 ms per layer between its kernels
// (a dozen op calls from Python, each with its checks and its cold-cache start; docs/benchmarks.md). It calls the
// very functions the layer's modules reach through the ops, in the modules' order, so its result is theirs bit for
// bit:
//   h1 = h + o_proj(attention(rope(q, k), cache + k, cache + v)),  q, k, v = projections(rms_norm(h, ln1))
//   out = h1 + moe_layer(rms_norm(h1, ln2))                         (each sum clamped to fp16's range in fp16)
// The step's key (after RoPE) and value are written at position `held` of the caller's cache buffers
// [1, kv_heads, capacity, head_dim], and attention reads positions [0, held]; the caller owns the buffers and
// their bookkeeping (compat.AppendingLayer).
struct DecodeLayerPack {
  at::Tensor ln1, ln2;
  double eps1 = 0, eps2 = 0, scaling = 1;
  int64_t heads = 0, kv_heads = 0, head_dim = 0, zero_offset = 0;
  bool int4 = false;
  std::vector<at::Tensor> projections;         // dense: q, k, v, o weights; int4: 4 GPTQ tensors per Linear
  c10::List<c10::optional<at::Tensor>> biases;  // q, k, v, o
  std::unique_ptr<Int4WeightCache> int4_cache;  // int4: q, k, v, o prepared, kept between calls

  DecodeLayerPack(at::Tensor ln1_, double eps1_, at::Tensor ln2_, double eps2_, std::vector<at::Tensor> projections_,
                  std::vector<c10::optional<at::Tensor>> biases_, bool int4_, int64_t zero_offset_, int64_t heads_,
                  int64_t kv_heads_, int64_t head_dim_, double scaling_)
      : ln1(std::move(ln1_)), ln2(std::move(ln2_)), eps1(eps1_), eps2(eps2_), scaling(scaling_), heads(heads_),
        kv_heads(kv_heads_), head_dim(head_dim_), zero_offset(zero_offset_), int4(int4_),
        projections(std::move(projections_)) {
    const char* op = "DecodeLayerPack";
    const size_t want = int4 ? 16 : 4;
    TORCH_CHECK(projections.size() == want, op, ": projections must hold ", int4 ? "the 4 GPTQ tensors (qweight, "
                "qzeros, scales, g_idx) of q, k, v and o (16)" : "the weights of q, k, v and o (4)", ", got ",
                projections.size());
    TORCH_CHECK(biases_.size() == 4, op, ": biases must hold one entry (a tensor or None) for each of q, k, v and o, "
                "got ", biases_.size());
    for (auto& b : biases_) biases.push_back(b);
    if (int4) int4_cache = std::make_unique<Int4WeightCache>(4);
    check_range(heads, 1, 1 << 20, op, "heads");
    check_range(kv_heads, 1, heads, op, "kv_heads");
    TORCH_CHECK(heads % kv_heads == 0, op, ": heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
    check_range(head_dim, 2, 1 << 16, op, "head_dim");
    TORCH_CHECK(head_dim % 2 == 0, op, ": head_dim must be even, got ", head_dim);
    check_range(zero_offset, 0, 1, op, "zero_offset");
    TORCH_CHECK(std::isfinite(eps1) && eps1 >= 0 && std::isfinite(eps2) && eps2 >= 0, op,
                ": eps must be finite and >= 0, got ", eps1, " and ", eps2);
    TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  }
};

// The step's part of the layer below is plain loops where it would otherwise be small ATen calls (a view, a copy,
// an add): in a decode step each runs with caches cold (the MoE block before it streamed ~36 MB of weights), where
// an ATen call costs ~15-35 us before its first element (docs/benchmarks.md), and a few microseconds when warm.

// x + y as the model's eager `residual + hidden_states`, then its clamp_fp16 (values past fp16's range would
// become inf, then NaN in the next norm): the same two roundings, so the same bits.
at::Tensor residual_add(const at::Tensor& x, const at::Tensor& y) {
  if (x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type()) {
    at::Tensor s = at::empty(x.sizes(), x.options());
    with_floating(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* a = x.data_ptr<T>();
      const T* b = y.data_ptr<T>();
      T* o = s.data_ptr<T>();
      const int64_t n = x.numel();
      if constexpr (std::is_same_v<T, Half>) {
        const float limit = static_cast<float>(static_cast<Half>(65504.0f - 1000.0f));  // clamp's bound, in fp16
        for (int64_t i = 0; i < n; ++i) {
          const float sum = static_cast<Half>(static_cast<float>(a[i]) + static_cast<float>(b[i]));  // x + y
          o[i] = static_cast<Half>(std::min(std::max(sum, -limit), limit));  // then the clamp; NaN stays NaN
        }
      } else {
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
      }
    });
    return s;
  }
  at::Tensor s = x + y;
  if (s.scalar_type() == at::kHalf) {
    const double limit = 65504.0 - 1000.0;  // torch.finfo(torch.float16).max - 1000, as clamp_fp16
    s = s.clamp(-limit, limit);
  }
  return s;
}

// step [1, kv_heads, 1, D] (the step's key or value) written at position `held` of a cache buffer
// [1, kv_heads, capacity, D] (checked by the caller; any strides): cache.narrow(2, held, 1).copy_(step). Buffers
// whose elements overlap (an expanded tensor) go to copy_, which refuses them.
void write_position(const at::Tensor& cache, int64_t held, const at::Tensor& step) {
  if (!step.is_contiguous() || step.scalar_type() != cache.scalar_type() ||
      step.numel() != cache.size(1) * cache.size(3) || at::has_internal_overlap(cache) == at::MemOverlap::Yes) {
    cache.narrow(2, held, 1).copy_(step);
    return;
  }
  const int64_t KVH = cache.size(1), D = cache.size(3), s1 = cache.stride(1), s3 = cache.stride(3);
  with_floating(cache.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* dst = cache.data_ptr<T>() + held * cache.stride(2);
    const T* src = step.data_ptr<T>();
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t d = 0; d < D; ++d) dst[h * s1 + d * s3] = src[h * D + d];
  });
}

// f(), with any error it raises prefixed by the decode_layer argument(s) it came from: the functions called below
// name their own arguments (x, weight, ...), which alone would not say which of the layer's tensors was at fault.
template <typename F>
auto naming(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "decode_layer: ", what, ": ", e.what_without_backtrace());
  }
}

std::tuple<at::Tensor, at::Tensor> decode_layer(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                                int64_t held, const c10::optional<at::Tensor>& mask,
                                                const DecodeLayerPack& p, const at::Tensor& router_weight,
                                                int64_t top_k, bool renormalize, const LayerPack& moe,
                                                const c10::optional<at::Tensor>& shared_expert_gate) {
  const char* op = "decode_layer";
  TensorArg(hidden, op, "hidden", kCpu).floating();
  TORCH_CHECK(hidden.dim() >= 1 && hidden.dim() <= 3 && hidden.numel() == hidden.size(-1) && hidden.numel() > 0,
              op, ": hidden must be one position of one sequence ([1, 1, hidden] or [1, hidden]), got shape ",
              hidden.sizes());
  const int64_t H = hidden.size(-1), NH = p.heads, KVH = p.kv_heads, D = p.head_dim;
  const at::ScalarType dtype = hidden.scalar_type();
  TensorArg(cos, op, "cos", kCpu).dtype(dtype).sizes({1, 1, D}, "the pack's head_dim");
  TensorArg(sin, op, "sin", kCpu).dtype(dtype).sizes({1, 1, D}, "the pack's head_dim");
  TensorArg(key_cache, op, "key_cache", kCpu).dtype(dtype).dim(4).sizes({1, KVH, -1, D}, "the pack's heads");
  TensorArg(value_cache, op, "value_cache", kCpu).dtype(dtype).dim(4)
      .sizes({1, KVH, key_cache.size(2), D}, "key_cache");
  TORCH_CHECK(!key_cache.is_alias_of(value_cache), op, ": key_cache and value_cache must not share memory");
  check_range(held, 0, key_cache.size(2) - 1, op, "held");  // the buffers must have room for one more position
  TORCH_CHECK(p.ln1.dim() == 1 && p.ln1.size(0) == H, op, ": hidden has ", H, " features, ln1 has shape ",
              p.ln1.sizes());
  const at::Tensor h = hidden.reshape({1, H});

  const at::Tensor x = naming("ln1", [&] { return rms_norm_cpu(h, p.ln1, p.eps1); });
  at::Tensor q, k, v;
  if (p.int4) {
    const std::vector<at::Tensor> out = naming("q_proj, k_proj, v_proj (projections[0:12], biases[0:3])", [&] {
      c10::List<c10::optional<at::Tensor>> qkv_bias({p.biases.get(0), p.biases.get(1), p.biases.get(2)});
      return gptq_linears_kept(x, at::TensorList(p.projections).slice(0, 12), qkv_bias, p.zero_offset,
                               p.int4_cache.get());
    });
    q = out[0], k = out[1], v = out[2];
  } else {
    q = naming("q_proj (projections[0], biases[0])", [&] { return dense_linear_cpu(x, p.projections[0], p.biases.get(0)); });
    k = naming("k_proj (projections[1], biases[1])", [&] { return dense_linear_cpu(x, p.projections[1], p.biases.get(1)); });
    v = naming("v_proj (projections[2], biases[2])", [&] { return dense_linear_cpu(x, p.projections[2], p.biases.get(2)); });
  }
  TORCH_CHECK(q.size(1) == NH * D && k.size(1) == KVH * D && v.size(1) == KVH * D, op,
              ": q_proj, k_proj, v_proj (projections) give ", q.size(1), ", ", k.size(1), ", ", v.size(1),
              " features; the pack's heads want ", NH * D, ", ", KVH * D, ", ", KVH * D);
  // [1, heads, 1, D] views of the projections, as the attention module's view(...).transpose(1, 2).
  auto [q_rot, k_rot] = rope_cpu(q.view({1, 1, NH, D}).transpose(1, 2), k.view({1, 1, KVH, D}).transpose(1, 2),
                                 cos, sin);
  write_position(key_cache, held, k_rot);
  write_position(value_cache, held, v.view({1, 1, KVH, D}).transpose(1, 2));
  const at::Tensor attn = naming("mask", [&] {
    return decode_attention_prefix(q_rot, key_cache, value_cache, held + 1, mask, p.scaling);
  });
  const at::Tensor a = attn.reshape({1, NH * D});
  const at::Tensor o = naming("o_proj (projections[3] or [12:16], biases[3])", [&] {
    return p.int4 ? gptq_linear_kept(a, p.projections.data() + 12, p.zero_offset, p.biases.get(3), p.int4_cache.get(),
                                     3)
                  : dense_linear_cpu(a, p.projections[3], p.biases.get(3));
  });
  TORCH_CHECK(o.size(1) == H, op, ": o_proj (projections) gives ", o.size(1), " features, hidden has ", H);
  const at::Tensor h1 = residual_add(h, o);

  const at::Tensor x2 = naming("ln2", [&] { return rms_norm_cpu(h1, p.ln2, p.eps2); });
  auto [moe_out, logits] = naming("the MoE block (router_weight, moe, shared_expert_gate)", [&] {
    return moe_layer_packed(x2, router_weight, top_k, renormalize, moe, shared_expert_gate);
  });
  return {residual_add(h1, moe_out).view(hidden.sizes()), logits};
}

}  // namespace

// The cpu backend's fused lane (moe/backends/cpu.py): the whole layer, router included, called as a plain Python
// function rather than through the dispatcher: with caches cold, as they are in decode, a dispatcher call from
// Python costs ~0.25 ms before the op starts, this ~0.1 ms. It runs only for plain CPU tensors outside
// torch.compile and dispatch / function modes; everything else routes in Python and goes through the registered ops
// (moe_ffn_cpu, moe_ffn_int4_cpu), which compute the same thing. The profiler still sees it (RECORD_FUNCTION), and
// it releases the GIL while it runs, as ops do.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<LayerPack>(m, "LayerPack")
      .def(py::init<std::vector<at::Tensor>, int64_t, bool, int64_t>(), py::arg("tensors"), py::arg("experts"),
           py::arg("int4"), py::arg("zero_offset"));
  qwen2_moe_hf::register_identity_watch(m);
  m.def("native_bf16_rows", [] { return native_rows(NativeKind::kBf16Weights); },
        "Rows per job from which bf16 weight GEMMs go to oneDNN (0: never): the CPU's default unless set.");
  m.def("set_native_bf16_rows", [](int64_t rows) { set_native_rows(NativeKind::kBf16Weights, rows); },
        py::arg("rows"));
  m.def("int4_vnni", [] { return kHaveVnni && vnni_enabled().load(); },
        "Whether bf16 / fp16 activations meet GPTQ 4-bit weights in VNNI integer dot products (int4_vnni.h).");
  m.def("set_int4_vnni", [](bool on) { vnni_enabled().store(on); }, py::arg("on"),
        "Switch the VNNI path off (False) or back on (True; it runs only where the build has it).");
  m.def("int4_vnni_compiled", [] { return kHaveVnni; });
  m.def("int4_vnni_row", [] { return vnni_row_enabled().load(); },
        "Whether one row of x on the VNNI path takes grouped_vnni_row (same result as the multi-row kernel).");
  m.def("set_int4_vnni_row", [](bool on) { vnni_row_enabled().store(on); }, py::arg("on"),
        "One row of x on the VNNI path: register-blocked grouped_vnni_row (True, default) or the multi-row kernel.");
  m.def("dense_row_lanes", [] { return kHaveRowLanes && row_lanes_enabled().load(); },
        "Whether one row of x takes the AVX-512 lanes kernels: dense_linear_cpu (bf16, fp16 weights), bf16 experts.");
  m.def("set_dense_row_lanes", [](bool on) { row_lanes_enabled().store(on); }, py::arg("on"),
        "Switch the lanes kernel off (False: the AVX2 stream kernels) or back on (True; where the build has it).");
  m.def("int4_jobs_together", [] { return int4_jobs_together().load(); },
        "Whether a decode step's one-row int4 expert jobs on the VNNI row kernel run in one parallel region.");
  m.def("set_int4_jobs_together", [](bool on) { int4_jobs_together().store(on); }, py::arg("on"),
        "Run them in one region (True, default) or one region per job (False): the same result bit for bit.");
  m.def("workspace_bytes", [] { return kept_workspace_bytes(); },
        "Bytes of the MoE layers' fp32 workspace kept between calls (at most 256 MiB; 0 after release_workspace).");
  m.def("release_workspace", [] { release_kept_workspace(); },
        "Free the kept workspace now (the next layer call allocates a new one).");
  m.def("bf16_dot", [] { return kHaveBf16Dot && bf16_dot_enabled().load(); },
        "Whether bf16 expert GEMMs of a few rows with bf16 activations take the vdpbf16ps kernel (bf16_dot.h).");
  m.def("set_bf16_dot", [](bool on) { bf16_dot_enabled().store(on); }, py::arg("on"),
        "Switch the vdpbf16ps kernel off (False) or back on (True; it runs only where the build has it).");
  m.def("bf16_dot_compiled", [] { return kHaveBf16Dot; });
  m.def("int4_path", [](int64_t rows, int64_t in_features, bool grouped, const std::string& activations) {
    TORCH_CHECK(activations == "float32" || activations == "float16" || activations == "bfloat16",
                "int4_path: activations must be 'float32', 'float16' or 'bfloat16', got '", activations, "'");
    const Int4Act act = activations == "bfloat16" ? Int4Act::kBFloat16
                        : activations == "float16" ? Int4Act::kHalf : Int4Act::kFloat;
    return std::string(int4_path_name(int4_path(rows, in_features, grouped, act)));
  }, py::arg("rows"), py::arg("in_features"), py::arg("grouped"), py::arg("activations"),
        "The path the int4 GEMM takes for these rows of x, from activations 'float32', 'float16' or 'bfloat16': "
        "onednn, sgemm, tiles, vnni or rows.");
  m.def("native_int4_rows", [] { return native_rows(NativeKind::kInt4Weights); },
        "Rows per job from which GPTQ 4-bit GEMMs are dequantized to bf16 and go to oneDNN (0: never).");
  m.def("set_native_int4_rows", [](int64_t rows) { set_native_rows(NativeKind::kInt4Weights, rows); },
        py::arg("rows"));
  py::class_<DecodeLayerPack>(m, "DecodeLayerPack")
      .def(py::init<at::Tensor, double, at::Tensor, double, std::vector<at::Tensor>,
                    std::vector<c10::optional<at::Tensor>>, bool, int64_t, int64_t, int64_t, int64_t, double>(),
           py::arg("ln1"), py::arg("eps1"), py::arg("ln2"), py::arg("eps2"), py::arg("projections"),
           py::arg("biases"), py::arg("int4"), py::arg("zero_offset"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("scaling"));
  // Layers' decode steps in order, each on the previous one's output (moe/decode_layer.py run_steps: one layer, or
  // every layer of the model in one call). Each step: (key_cache, value_cache, held, mask, cos, sin, pack,
  // router_weight, top_k, renormalize, moe, shared_expert_gate), as decode_layer takes them. -> (the last layer's
  // output, [each layer's router logits], [each layer's key_cache[:, :, :held + 1]], [the same of value_cache]: the
  // views its cache layer commits, made here rather than from Python). The items are read with the GIL held, the
  // layers run without it.
  // norm_weight (optional): the model's final RMSNorm applied to the last output (rms_norm_cpu, as its module
  // computes it), so that the model's forward does not call the norm from Python with caches cold.
  m.def("decode_layers", [](const at::Tensor& hidden, const std::vector<py::tuple>& steps,
                            const c10::optional<at::Tensor>& norm_weight, double norm_eps) {
    struct Step {
      at::Tensor key_cache, value_cache, cos, sin, router_weight;
      c10::optional<at::Tensor> mask, shared_expert_gate;
      int64_t held = 0, top_k = 0;
      bool renormalize = false;
      const DecodeLayerPack* pack = nullptr;
      const LayerPack* moe = nullptr;
    };
    static const char* names[12] = {"key_cache", "value_cache", "held", "mask", "cos", "sin", "pack",
                                    "router_weight", "top_k", "renormalize", "moe", "shared_expert_gate"};
    std::vector<Step> parsed(steps.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      const py::tuple& t = steps[i];
      TORCH_CHECK(t.size() == 12, "decode_layers: steps[", i, "] must hold 12 items (key_cache, value_cache, held, "
                  "mask, cos, sin, pack, router_weight, top_k, renormalize, moe, shared_expert_gate), got ", t.size());
      auto item = [&](int j, auto tag) {
        using V = decltype(tag);
        try {
          return t[j].cast<V>();
        } catch (const py::cast_error&) {
          TORCH_CHECK(false, "decode_layers: steps[", i, "][", j, "] (", names[j], ") has the wrong type or value: ",
                      py::str(py::repr(t[j].get_type())).cast<std::string>());
        }
      };
      auto optional = [&](int j) {
        return t[j].is_none() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(item(j, at::Tensor{}));
      };
      Step& s = parsed[i];
      s.key_cache = item(0, at::Tensor{});
      s.value_cache = item(1, at::Tensor{});
      s.held = item(2, int64_t{});
      s.mask = optional(3);
      s.cos = item(4, at::Tensor{});
      s.sin = item(5, at::Tensor{});
      try {
        s.pack = &t[6].cast<const DecodeLayerPack&>();
        s.moe = &t[10].cast<const LayerPack&>();
      } catch (const py::cast_error&) {
        TORCH_CHECK(false, "decode_layers: steps[", i, "]: pack must be a DecodeLayerPack and moe a LayerPack");
      }
      s.router_weight = item(7, at::Tensor{});
      s.top_k = item(8, int64_t{});
      s.renormalize = item(9, bool{});
      s.shared_expert_gate = optional(11);
    }
    const char* op = "decode_layers";
    TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0, op, ": norm_eps must be finite and >= 0, got ", norm_eps);
    py::gil_scoped_release no_gil;
    at::Tensor h = hidden;
    std::vector<at::Tensor> logits, keys, values;
    for (size_t i = 0; i < parsed.size(); ++i) {
      const Step& s = parsed[i];
      RECORD_FUNCTION("qwen2_moe_hf::decode_layer", std::vector<c10::IValue>({h}));
      try {
        auto [out, l] = decode_layer(h, s.cos, s.sin, s.key_cache, s.value_cache, s.held, s.mask, *s.pack,
                                     s.router_weight, s.top_k, s.renormalize, *s.moe, s.shared_expert_gate);
        h = out;
        logits.push_back(l);
        keys.push_back(s.key_cache.narrow(2, 0, s.held + 1));
        values.push_back(s.value_cache.narrow(2, 0, s.held + 1));
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "decode_layers: steps[", i, "]: ", e.what_without_backtrace());
      }
    }
    if (norm_weight) {  // h: the last layer's output (decode_layer checked hidden), or hidden itself
      TORCH_CHECK(h.dim() >= 1, op, ": hidden must have at least 1 dimension, got a 0-D tensor");
      TensorArg(*norm_weight, op, "norm_weight", kCpu).dtype(h.scalar_type()).sizes({h.size(-1)}, "hidden");
      h = rms_norm_cpu(h, *norm_weight, norm_eps);
    }
    return std::make_tuple(h, logits, keys, values);
  }, py::arg("hidden"), py::arg("steps"), py::arg("norm_weight") = py::none(), py::arg("norm_eps") = 0.0);
  m.def("moe_layer", [](const at::Tensor& x, const at::Tensor& router_weight, int64_t top_k, bool renormalize,
                        const LayerPack& pack, const c10::optional<at::Tensor>& shared_expert_gate) {
    RECORD_FUNCTION("qwen2_moe_hf::moe_layer", std::vector<c10::IValue>({x}));
    py::gil_scoped_release no_gil;
    return moe_layer_packed(x, router_weight, top_k, renormalize, pack, shared_expert_gate);
  });
}

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) {
  m.impl("moe_ffn_cpu", &moe_ffn_cpu);
  m.impl("moe_ffn_int4_cpu", &moe_ffn_int4_cpu);
  m.impl("dense_linear_cpu", &dense_linear_cpu);
}
