// The MoE layer's feed-forward on CPU in one op: routed experts (grouped by expert) + the gated shared expert.
//
// Why: on CPUs without native bf16 matmul (AVX2-only machines) oneDNN's bf16 GEMM runs at ~20 GFLOP/s at every M,
// so the expert GEMMs, which have few rows each, cost several times their memory floor. Here weights are read once
// in their storage dtype (bf16 / fp16 / fp32) and widened to fp32 on the way. By rows per expert (M):
//   M <= 4: stream4 / stream_split read each weight once, straight from memory (bandwidth-bound: decode);
//   M < 768: 6 weight rows are widened into an L2 buffer and xt_block multiplies them with 16 rows of x at a time
//            (compute-bound, ~100 GFLOP/s per AVX2 core);
//   larger: the whole weight is widened once and MKL's sgemm takes it.
//
// Contract (schema in qwen2_moe_hf/moe/ops.py):
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
//   Deterministic: every sum runs in a fixed order, whatever the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "int4_gemm.h"
#include "vec.h"

namespace {

using namespace qmoe;

using at::BFloat16;
using at::Half;

// Rows per job from which widening the whole weight to fp32 and calling MKL's sgemm beats xt_block (measured at
// the real shape, 2 threads: xt_block won up to 512 rows, bf16 and fp32 alike; sgemm at 1024). Below that, MKL's
// small-M sgemm runs at 30-55 GFLOP/s here against ~100 per core for xt_block.
constexpr int64_t kSgemmRows = 768;
// Rows per job up to which weights are streamed (each 4-row tile read once per pair of rows) rather than widened.
constexpr int64_t kStreamRows = 4;
// Output rows per parallel work item (64 rows x K=2048 bf16 = 256 KiB of weights).
constexpr int64_t kTileN = 64;


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

// For experts with several rows, x transposed: y[m, j] = sum_k buf[j, k] * xt[k, m] for one block of up to 16
// rows of x, packed as xt [K, 16] (pack16). Each step broadcasts one widened weight and multiplies it with 8 or 16
// rows of x at once: NR x MV accumulators stay in registers for the whole K and there is no horizontal sum.
template <int NR, int MV>
QMOE_KERNEL void xt_block(const float* xt, int64_t K, const float* buf, int64_t rows, float* y, int64_t ldy) {
  __m256 acc[NR][MV];
  QMOE_UNROLL
  for (int j = 0; j < NR; ++j)
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[MV];
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xt + k * 16 + v * 8);
    QMOE_UNROLL
    for (int j = 0; j < NR; ++j) {
      const __m256 b = _mm256_broadcast_ss(buf + j * K + k);
      QMOE_UNROLL
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_fmadd_ps(b, xv[v], acc[j][v]);
    }
  }
  // All lanes out first, then the valid rows: a lane loop with a data-dependent bound over acc itself made GCC
  // keep a memory copy of every accumulator, stored on each step of the loop above (half speed).
  alignas(32) float lanes[NR][MV * 8];
  QMOE_UNROLL
  for (int j = 0; j < NR; ++j)
    QMOE_UNROLL
    for (int v = 0; v < MV; ++v) _mm256_store_ps(&lanes[j][v * 8], acc[j][v]);
  for (int64_t m = 0; m < rows; ++m)
    QMOE_UNROLL
    for (int j = 0; j < NR; ++j) y[m * ldy + j] = lanes[j][m];
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

// NR widened weight rows (buf) times every 16-row block of x (xt): 16-row blocks use two vectors per weight, a
// last block of up to 8 rows one.
template <int NR>
inline void xt_tile(const float* xt, int64_t M, int64_t K, const float* buf, float* y, int64_t ldy) {
  for (int64_t b = 0; b * 16 < M; ++b) {
    const int64_t rows = std::min<int64_t>(16, M - b * 16);
    if (rows > 8) xt_block<NR, 2>(xt + b * 16 * K, K, buf, rows, y + b * 16 * ldy, ldy);
    else xt_block<NR, 1>(xt + b * 16 * K, K, buf, rows, y + b * 16 * ldy, ldy);
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

template <typename T>
inline void widen(const T* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < count; ++i) dst[i] = to_float(src[i]);
}
#endif

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
  } else {
    // Widen 6 weight rows at a time to fp32 (fp32 weights are used in place), then xt_block over every 16-row block
    // of x: 6 weight rows x 16 x-rows = 12 accumulators + 2 x vectors + 1 broadcast, 15 of AVX2's 16 registers.
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : 6 * K);
    auto tile = [&](int64_t rows) -> const float* {
      if constexpr (std::is_same<T, float>::value) return w + n * K;
      widen(w + n * K, rows * K, buf.data());
      return buf.data();
    };
    for (; n + 6 <= n1; n += 6) xt_tile<6>(xs, M, K, tile(6), y + n, ldy);
    for (; n + 2 <= n1; n += 2) xt_tile<2>(xs, M, K, tile(2), y + n, ldy);
    for (; n < n1; ++n) xt_tile<1>(xs, M, K, tile(1), y + n, ldy);
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
template <typename T>
void run_jobs(const std::vector<Job>& jobs) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  std::vector<const Job*> tiled;
  std::vector<int64_t> first_item{0};
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  for (const Job& job : jobs) {
    if (job.M >= kSgemmRows) {
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
  for (const Job* job : tiled) first_item.push_back(first_item.back() + (job->N + kTileN - 1) / kTileN);
  // x rows in the layout the kernels read: split16 for stream_split (bf16, few rows), pack16 for xt_block (more
  // rows); one copy per distinct x, as gate and up share theirs. Small next to the weights.
  std::vector<const float*> x_prep(tiled.size(), nullptr);
#ifdef QMOE_AVX2
  std::vector<std::vector<float>> x_prep_store;
  std::vector<std::pair<const float*, const float*>> done;  // (x, its prepared copy)
  for (size_t j = 0; j < tiled.size(); ++j) {
    const Job& job = *tiled[j];
    const bool split = job.M <= kStreamRows && std::is_same<T, BFloat16>::value;
    if (job.M <= kStreamRows && !split) continue;
    auto it = std::find_if(done.begin(), done.end(), [&](const auto& d) { return d.first == job.x; });
    if (it != done.end()) {
      x_prep[j] = it->second;
      continue;
    }
    if (split) {
      x_prep_store.emplace_back(job.M * job.K);
      split16(job.x, job.M, job.K, x_prep_store.back().data());
    } else {
      x_prep_store.emplace_back((job.M + 15) / 16 * 16 * job.K);
      pack16(job.x, job.M, job.K, x_prep_store.back().data());
    }
    x_prep[j] = x_prep_store.back().data();
    done.emplace_back(job.x, x_prep[j]);
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
      const int64_t n0 = (item - first_item[j]) * kTileN;
      const int64_t n1 = std::min(job.N, n0 + kTileN);
      rows_times_weight(job.x, x_prep[j], job.M, job.K, static_cast<const T*>(job.w), n0, n1, job.y, job.ldy);
    }
  });
}

// Int4 jobs, one after another, each split into one contiguous column slice per thread: every thread then walks
// the longest possible row segments of qweight. (One region over tiles of all jobs, as run_jobs does, measured
// 1.5x slower for a decode step: 5.0 vs 3.4 ms, shorter segments and threads on different matrices.)
void run_int4_jobs(const std::vector<const Job*>& jobs) {
  const int64_t threads = at::get_num_threads();
  for (const Job* job : jobs) {
    if (job->M >= kInt4SgemmRows) {
      int4_sgemm(*job->q, job->x, job->M, job->y, job->ldy);
      continue;
    }
    const std::vector<float> sums = job->q->row_sums(job->x, job->M, job->K);
    const int64_t blocks = job->N / 8;
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s)
        int4_rows_times_weight(*job->q, job->x, job->M, job->K, sums.data(), 8 * (blocks * s / slices),
                               8 * (blocks * (s + 1) / slices), job->y, job->ldy);
    });
  }
}

void run_jobs_any(at::ScalarType dtype, const std::vector<Job>& jobs) {
  std::vector<const Job*> int4;
  std::vector<Job> dense;
  for (const Job& job : jobs) {
    if (job.M == 0) continue;
    if (job.q != nullptr) int4.push_back(&job); else dense.push_back(job);
  }
  if (!int4.empty()) run_int4_jobs(int4);
  if (dense.empty()) return;
  switch (dtype) {
    case at::kFloat: return run_jobs<float>(dense);
    case at::kBFloat16: return run_jobs<BFloat16>(dense);
    case at::kHalf: return run_jobs<Half>(dense);
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

// The layer after its router: align (token, slot) pairs by expert, GEMM1 (gate, up) -> SiLU*up -> GEMM2, then
// combine each token's k slots in order plus the gated shared expert. Weights come through `lw`.
at::Tensor moe_ffn_core(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                        const LayerWeights& lw, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [tokens, hidden], got ", x.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_ids.scalar_type() == at::kLong, op,
              ": topk_ids must be int64 [tokens, k], got ", topk_ids.sizes(), " ", topk_ids.scalar_type());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), op, ": topk_weights must match topk_ids' shape");
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1), E = lw.E, I = lw.I, S = lw.S;

  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor ids = topk_ids.contiguous();
  at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < E, op, ": expert id ", id[i], " out of range [0, ", E, ")");

  // Align: (token, slot) pairs sorted by expert, tokens ascending within an expert (a stable counting sort).
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) offsets[id[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> pair_of_slot(T * k), cursor(offsets.begin(), offsets.end() - 1);
  std::vector<int64_t> token_of_pair(T * k);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t p = cursor[id[i]]++;
    pair_of_slot[i] = p;
    token_of_pair[p] = i / k;
  }
  const int64_t P = T * k;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xs = at::empty({P, H}, f32);
  const float* xp = xf.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) std::copy(xp + token_of_pair[p] * H, xp + (token_of_pair[p] + 1) * H, xsp + p * H);
  });

  // GEMM1: gate and up of every routed expert, and of the shared expert, in one parallel region.
  at::Tensor gu = at::empty({P, 2 * I}, f32);
  at::Tensor act = at::empty({P, I}, f32);
  at::Tensor ys = at::empty({P, H}, f32);
  at::Tensor sgu, sact, shared_out, shared_scale;
  std::vector<Job> gemm1, gemm2;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t M = offsets[e + 1] - offsets[e];
    if (M == 0) continue;
    const float* xe = xsp + offsets[e] * H;
    float* gue = gu.data_ptr<float>() + offsets[e] * 2 * I;
    Job g{xe, M, nullptr, gue, I, H, 2 * I}, u{xe, M, nullptr, gue + I, I, H, 2 * I};
    Job d{act.data_ptr<float>() + offsets[e] * I, M, nullptr, ys.data_ptr<float>() + offsets[e] * H, H, I, H};
    lw.expert(g, e, 0);
    lw.expert(u, e, 1);
    lw.expert(d, e, 2);
    gemm1.push_back(g);
    gemm1.push_back(u);
    gemm2.push_back(d);
  }
  if (S > 0) {
    TORCH_CHECK(lw.shared_expert_gate.has_value() && lw.shared_expert_gate->numel() == H, op,
                ": shared_expert_gate must have hidden=", H, " weights");
    sgu = at::empty({T, 2 * S}, f32);
    sact = at::empty({T, S}, f32);
    shared_out = at::empty({T, H}, f32);
    Job g{xp, T, nullptr, sgu.data_ptr<float>(), S, H, 2 * S}, u{xp, T, nullptr, sgu.data_ptr<float>() + S, S, H, 2 * S};
    Job d{sact.data_ptr<float>(), T, nullptr, shared_out.data_ptr<float>(), H, S, H};
    lw.shared(g, 0);
    lw.shared(u, 1);
    lw.shared(d, 2);
    gemm1.push_back(g);
    gemm1.push_back(u);
    gemm2.push_back(d);
    shared_scale = at::sigmoid(at::mv(xf, lw.shared_expert_gate->reshape({H}).to(at::kFloat)));
  }
  run_jobs_any(lw.dense_dtype, gemm1);
  silu_mul(gu.data_ptr<float>(), P, I, act.data_ptr<float>());
  if (S > 0) silu_mul(sgu.data_ptr<float>(), T, S, sact.data_ptr<float>());
  run_jobs_any(lw.dense_dtype, gemm2);

  // Combine: per token, its k slots in order, then the gated shared expert.
  at::Tensor out = at::empty({T, H}, f32);
  float* o_all = out.data_ptr<float>();
  const float* yp = ys.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  const float* so = S > 0 ? shared_out.data_ptr<float>() : nullptr;
  const float* ss = S > 0 ? shared_scale.data_ptr<float>() : nullptr;
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* o = o_all + t * H;
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = wp[t * k + j];
        const float* y = yp + pair_of_slot[t * k + j] * H;
        for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
      }
      if (so) {
        const float s = ss[t];
        for (int64_t h = 0; h < H; ++h) o[h] += s * so[t * H + h];
      }
    }
  });
  return out.to(x.scalar_type());
}

at::Tensor moe_ffn_cpu(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       at::TensorList w_gate, at::TensorList w_up, at::TensorList w_down,
                       const c10::optional<at::Tensor>& shared_gate, const c10::optional<at::Tensor>& shared_up,
                       const c10::optional<at::Tensor>& shared_down,
                       const c10::optional<at::Tensor>& shared_expert_gate) {
  TORCH_CHECK(x.dim() == 2, "moe_ffn_cpu: x must be [tokens, hidden], got ", x.sizes());
  const int64_t H = x.size(1);
  const int64_t E = static_cast<int64_t>(w_gate.size());
  TORCH_CHECK(E > 0 && w_up.size() == w_gate.size() && w_down.size() == w_gate.size(),
              "moe_ffn_cpu: need one gate, up and down weight per expert");
  const int64_t I = w_gate[0].size(0);
  const at::ScalarType wdt = w_gate[0].scalar_type();
  for (int64_t e = 0; e < E; ++e) {
    for (const at::Tensor* t : {&w_gate[e], &w_up[e], &w_down[e]}) {
      TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == wdt,
                  "moe_ffn_cpu: expert ", e, " weights must be contiguous 2-D CPU tensors of one dtype");
    }
    TORCH_CHECK(w_gate[e].size(0) == I && w_gate[e].size(1) == H && w_up[e].sizes() == w_gate[e].sizes(),
                "moe_ffn_cpu: expert ", e, " gate/up must be [", I, ", ", H, "], got ", w_gate[e].sizes());
    TORCH_CHECK(w_down[e].size(0) == H && w_down[e].size(1) == I,
                "moe_ffn_cpu: expert ", e, " down must be [", H, ", ", I, "], got ", w_down[e].sizes());
  }
  LayerWeights lw;
  lw.E = E;
  lw.I = I;
  lw.dense_dtype = wdt;
  lw.expert = [&](Job& job, int64_t e, int which) {
    job.w = (which == 0 ? w_gate : which == 1 ? w_up : w_down)[e].data_ptr();
  };
  if (shared_gate.has_value() && shared_gate->defined()) {
    TORCH_CHECK(shared_up.has_value() && shared_down.has_value() && shared_expert_gate.has_value(),
                "moe_ffn_cpu: the shared expert needs gate, up, down and shared_expert_gate weights");
    const at::Tensor& sg = *shared_gate;
    const at::Tensor& su = *shared_up;
    const at::Tensor& sd = *shared_down;
    lw.S = sg.size(0);
    TORCH_CHECK(sg.dim() == 2 && sg.size(1) == H && su.sizes() == sg.sizes() && sd.dim() == 2 && sd.size(0) == H &&
                    sd.size(1) == lw.S, "moe_ffn_cpu: shared expert weights must be [S,H], [S,H], [H,S]");
    TORCH_CHECK(sg.is_contiguous() && su.is_contiguous() && sd.is_contiguous() && sg.scalar_type() == wdt &&
                    su.scalar_type() == wdt && sd.scalar_type() == wdt,
                "moe_ffn_cpu: shared expert weights must be contiguous, in the experts' dtype");
    lw.shared = [&](Job& job, int which) { job.w = (which == 0 ? sg : which == 1 ? su : sd).data_ptr(); };
    lw.shared_expert_gate = shared_expert_gate;
  }
  return moe_ffn_core(x, topk_ids, topk_weights, lw, "moe_ffn_cpu");
}

// The same layer with GPTQ 4-bit experts: `experts` holds 12 tensors per expert, (qweight, qzeros, scales,
// g_idx) for gate, up, down; `shared` the same 12 for the shared expert, or nothing.
at::Tensor moe_ffn_int4_cpu(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                            at::TensorList experts, at::TensorList shared,
                            const c10::optional<at::Tensor>& shared_expert_gate, int64_t zero_offset) {
  TORCH_CHECK(!experts.empty() && experts.size() % 12 == 0, "moe_ffn_int4_cpu: experts must hold 12 tensors "
              "(qweight, qzeros, scales, g_idx for gate, up, down) per expert, got ", experts.size());
  TORCH_CHECK(shared.empty() || shared.size() == 12, "moe_ffn_int4_cpu: shared must hold 12 tensors or none");
  TORCH_CHECK(x.dim() == 2, "moe_ffn_int4_cpu: x must be [tokens, hidden], got ", x.sizes());
  const int64_t H = x.size(1);
  LayerWeights lw;
  lw.E = static_cast<int64_t>(experts.size()) / 12;
  TORCH_CHECK(experts[0].dim() == 2, "moe_ffn_int4_cpu: expert 0 gate_proj qweight must be [H/8, I]");
  lw.I = experts[0].size(1);  // gate's qweight is [H/8, I]
  std::vector<Int4Weight> prepared(3 * lw.E + 3);
  static const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
  auto prepare = [&](Int4Weight& w, at::TensorList t, size_t at, int which, int64_t K, int64_t N,
                     const std::string& who) {
    w.prepare(t[at], t[at + 1], t[at + 2], t[at + 3], zero_offset, who.c_str());
    TORCH_CHECK(w.K == K && w.N == N, who, ": expected a ", K, " -> ", N, " Linear, qweight holds ", w.K, " -> ",
                w.N, " (", names[which], ")");
  };
  lw.expert = [&](Job& job, int64_t e, int which) {
    Int4Weight& w = prepared[3 * e + which];
    const int64_t K = which == 2 ? lw.I : H, N = which == 2 ? H : lw.I;
    prepare(w, experts, 12 * e + 4 * which, which, K, N,
            "moe_ffn_int4_cpu: expert " + std::to_string(e) + " " + names[which]);
    job.q = &w;
  };
  if (!shared.empty()) {
    lw.S = shared[0].size(1);
    lw.shared = [&](Job& job, int which) {
      Int4Weight& w = prepared[3 * lw.E + which];
      const int64_t K = which == 2 ? lw.S : H, N = which == 2 ? H : lw.S;
      prepare(w, shared, 4 * which, which, K, N, std::string("moe_ffn_int4_cpu: shared expert ") + names[which]);
      job.q = &w;
    };
    lw.shared_expert_gate = shared_expert_gate;
  }
  return moe_ffn_core(x, topk_ids, topk_weights, lw, "moe_ffn_int4_cpu");
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) {
  m.impl("moe_ffn_cpu", &moe_ffn_cpu);
  m.impl("moe_ffn_int4_cpu", &moe_ffn_int4_cpu);
}
