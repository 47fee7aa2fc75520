// The GPTQ 4-bit GEMM primitive shared by gptq_linear_cpu (one Linear) and moe_ffn_int4_cpu (a whole MoE layer).
// It reads qweight in either of two layouts of the same int32 words:
//   checkpoint: [K/8, N] (input 8r+j of column n in bits 4j..4j+3 of qweight[r, n]), as GPTQ files store it;
//   blocked:    [N/64, K/8, 64], qweight_blocked[b, r, c] = qweight[r, 64 b + c]: each block of 64 columns is one
//               contiguous stream (GPTQLinear switches to it once after loading on CPU, gptq/linear.py). A decode
//               step's GEMV walks a column block over all K/8 rows; in the checkpoint layout that is 256 bytes per
//               row at a stride of N x 4 bytes, which the hardware prefetchers follow poorly (~16 GB/s from DRAM
//               against ~31-39 blocked, 2 threads, Zen 4; docs/benchmarks.md).
//
//   qzeros int32 [G, N/8], scales [G, N] (fp32/fp16/bf16), g_idx int32 [K]
//   W[n,k] = scales[g,n] * (q[k,n] - (z[g,n] + zero_offset)), g = g_idx[k]
//
// By rows of x (M):
//   M < kInt4TileRows (16; 24 for K > 4096): unpack the weights once per 4 rows (int4_rows_times_weight), by:
//   grouped (every packed row of 8 inputs lies in one group, e.g. g_idx = k // G with G a multiple of 8, the
//     common case): sum x*q over a run of one group first and apply its scale and zero once:
//     y[n] += s[g,n] * (sum_k x[k] q[k,n] - z[g,n] * sum_k x[k]), so the inner loop is unpack + FMA only;
//   general (act-order g_idx): dequantize each weight with its own group's scale and zero.
//   kInt4TileRows <= M < kInt4SgemmRows: 16 columns of W at a time dequantized to fp32 into an L2 buffer, then a
//     register-blocked GEMM (6 rows of x x 16 columns in 12 accumulators) over every row of x (int4_tiles);
//   larger: W dequantized to fp32 once and MKL's sgemm.
// On AVX-512 VNNI builds, bf16 and fp16 activations with grouped weights take integer dot products at every M instead
// (int4_vnni.h: one row by grouped_vnni_row, more by register tiles of 8 rows): at the real shapes 1.7-2.5x the
// float paths from 2 to 1024 rows (docs/benchmarks.md), with x rounded to two int8 planes (error ~3e-4 relative).
// Accumulation is fp32 in a fixed order (independent of the thread count).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "native_bf16.h"
#include "vec.h"

namespace qmoe {

constexpr int kInt4RowsPerPass = 4;
// Rows of x from which the tile path beats unpacking once per 4 rows (K up to 4096, and longer: the tile buffer is
// 64 bytes per k), and from which dequantizing the whole weight once and calling sgemm beats the tile path.
// Measured on one GPTQ Linear (group 128, 2 threads, bf16 x, interleaved): tiles won from 14-16 rows at K=1408,
// tied at 16-18 rows at K=2048, lost at 16 and won at 24 at K=5632. Against sgemm the tiles won at every size up
// to 1024 rows (K=2048, N=1408: 2.1x at 32 and 64 rows, 1.3x at 256, 1.05x at 1024; K=5632: 4.5x at 64, 2.4x at
// 256).
constexpr int64_t kInt4TileRows = 16;
constexpr int64_t kInt4TileRowsLongK = 24;
constexpr int64_t kInt4SgemmRows = 1024;
// Packed rows ahead that the grouped path prefetches: a column tile jumps between rows, which hardware
// prefetchers follow poorly; without it one decode row read ~5 GB/s from DRAM instead of ~8.
constexpr int64_t kInt4PrefetchRows = 6;
// Columns per block of the blocked qweight layout (the one-row VNNI kernel's block: 4 vectors of 16).
constexpr int64_t kInt4BlockCols = 64;

#ifdef QMOE_AVX2
using V8 = __m256;
inline V8 v_zero() { return _mm256_setzero_ps(); }
inline V8 v_load(const float* p) { return _mm256_loadu_ps(p); }
inline void v_store(float* p, V8 v) { _mm256_storeu_ps(p, v); }
inline V8 v_set1(float a) { return _mm256_set1_ps(a); }
inline V8 v_fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
inline V8 v_add(V8 a, V8 b) { return _mm256_add_ps(a, b); }
inline V8 v_sub(V8 a, V8 b) { return _mm256_sub_ps(a, b); }
inline V8 v_mul(V8 a, V8 b) { return _mm256_mul_ps(a, b); }
// The 8 fields of 8 packed int32 (8 columns): w[j] = field j of each column, as floats.
inline void unpack8(const int32_t* p, V8 w[8]) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi32(15);
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(q, mask));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 4), mask));
  w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 8), mask));
  w[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 12), mask));
  w[4] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 16), mask));
  w[5] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 20), mask));
  w[6] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 24), mask));
  w[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 28));
}
// Like unpack8, but field j comes out multiplied by 16^j (masked in place, not shifted down: one op less per
// field); the caller divides x by 16^j instead, which is exact (a power of two). Field 7 is shifted, because
// masking it in place would set the sign bit.
inline void unpack8_in_place(const int32_t* p, V8 w[8]) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF)));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF0)));
  w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF00)));
  w[3] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF000)));
  w[4] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF0000)));
  w[5] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF00000)));
  w[6] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF000000)));
  w[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 28));
}
constexpr bool kFieldsInPlace = true;
// The 8 zeros one qzeros int32 holds (columns 8c .. 8c+7), plus the format's offset.
inline V8 zeros8(int32_t packed, float offset) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(packed), shifts), _mm256_set1_epi32(15));
  return _mm256_add_ps(_mm256_cvtepi32_ps(z), _mm256_set1_ps(offset));
}
template <typename S>
inline V8 scales8(const S* p) { return load8(p); }
inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
#else
// Portable fallback with the same operations on 8 floats; compilers vectorize the loops.
struct V8 { float v[8]; };
inline V8 v_zero() { return V8{}; }
inline V8 v_load(const float* p) { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
inline void v_store(float* p, V8 a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
inline V8 v_set1(float a) { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = a; return r; }
inline V8 v_fma(V8 a, V8 b, V8 c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline V8 v_add(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
inline V8 v_sub(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i]; return a; }
inline V8 v_mul(V8 a, V8 b) { for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i]; return a; }
inline void unpack8(const int32_t* p, V8 w[8]) {
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 8; ++i) w[j].v[i] = static_cast<float>((static_cast<uint32_t>(p[i]) >> (4 * j)) & 15u);
}
inline V8 zeros8(int32_t packed, float offset) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>((static_cast<uint32_t>(packed) >> (4 * i)) & 15u) + offset;
  return r;
}
template <typename S>
inline V8 scales8(const S* p) { V8 r; for (int i = 0; i < 8; ++i) r.v[i] = to_float(p[i]); return r; }
inline void prefetch(const void*) {}
inline void unpack8_in_place(const int32_t* p, V8 w[8]) { unpack8(p, w); }
constexpr bool kFieldsInPlace = false;
#endif

// One GPTQ 4-bit weight, checked and prepared for the GEMM (run boundaries, or dequantization tables for the
// general path). Holds the tensors it reads (contiguous copies of any that were not), so its pointers stay valid
// for as long as it lives.
struct Int4Weight {
  at::Tensor qweight_t, qzeros_t, scales_t, g_idx_t;
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const void* scales = nullptr;
  at::ScalarType scale_type = at::kHalf;
  const int32_t* g_idx = nullptr;
  int64_t K = 0, N = 0, groups = 0;
  bool blocked = false;                  // qweight in the blocked layout [N/64, K/8, 64]
  float zero_offset = 1.f;
  std::vector<int64_t> runs;             // packed-row starts of one-group runs, + K/8; empty: general path
  std::vector<float> scale_f, zero_f;    // [groups, N], general path only

  // Checks every tensor (CPU, dtype, shape; `what` names the weight in errors) and g_idx's range, then prepares
  // the path. zero_offset is the format's (1: "gptq" v1, 0: "gptq_v2").
  // (in_features K, out_features N) of a qweight in either layout, after checking its device, dtype and shape
  // (`what` names the weight in errors). Cheap: callers that only need the sizes use it without prepare().
  static std::pair<int64_t, int64_t> sizes_of(const at::Tensor& qw, const std::string& what) {
    const char* op = what.c_str();
    TensorArg(qw, op, "qweight", at::Device(at::kCPU)).dtype(at::kInt);
    TORCH_CHECK(qw.dim() == 2 || (qw.dim() == 3 && qw.size(2) == kInt4BlockCols), what,
                ": qweight must be [in_features/8, out_features] or, blocked, [out_features/64, in_features/8, 64]"
                ", got shape ", qw.sizes());
    const bool b = qw.dim() == 3;
    const int64_t k = checked_mul(qw.size(b ? 1 : 0), 8, op, "qweight rows x 8");
    const int64_t n = b ? checked_mul(qw.size(0), kInt4BlockCols, op, "qweight blocks x 64") : qw.size(1);
    TORCH_CHECK(n % 8 == 0, what, ": qweight has ", n, " columns (out_features), not a multiple of 8");
    return {k, n};
  }

  void prepare(const at::Tensor& qw, const at::Tensor& qz, const at::Tensor& sc, const at::Tensor& gi,
               int64_t zero_off, const std::string& what) {
    const char* op = what.c_str();
    const at::Device cpu(at::kCPU);
    std::tie(K, N) = sizes_of(qw, what);
    blocked = qw.dim() == 3;
    qweight_t = TensorArg(qw, op, "qweight", cpu).contiguous();
    scales_t = TensorArg(sc, op, "scales", cpu).floating().sizes({-1, N}, "qweight").contiguous();
    groups = scales_t.size(0);
    qzeros_t = TensorArg(qz, op, "qzeros", cpu).dtype(at::kInt).sizes({groups, N / 8}, "scales and qweight")
                   .contiguous();
    g_idx_t = TensorArg(gi, op, "g_idx", cpu).dtype(at::kInt).sizes({K}, "qweight").contiguous();
    check_range(zero_off, 0, 1, op, "zero_offset");
    scale_type = scales_t.scalar_type();
    qweight = qweight_t.data_ptr<int32_t>();
    qzeros = qzeros_t.data_ptr<int32_t>();
    scales = scales_t.data_ptr();
    g_idx = g_idx_t.data_ptr<int32_t>();
    zero_offset = static_cast<float>(zero_off);
    bool grouped = true;
    runs.clear();
    for (int64_t r = 0; r < K / 8; ++r) {
      const int32_t g = g_idx[8 * r];
      for (int j = 0; j < 8; ++j) {
        const int32_t gj = g_idx[8 * r + j];
        TORCH_CHECK(gj >= 0 && gj < groups, what, ": g_idx[", 8 * r + j, "] = ", gj, " is outside the ", groups,
                    " groups of scales");
        grouped = grouped && gj == g;
      }
      if (r == 0 || g_idx[8 * (r - 1)] != g) runs.push_back(r);
    }
    runs.push_back(K / 8);
    if (!grouped) {
      runs.clear();
      scale_f.resize(groups * N);
      zero_f.resize(groups * N);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t n = 0; n < N; ++n) {
          scale_f[g * N + n] = scale_at(g * N + n);
          const uint32_t packed = static_cast<uint32_t>(qzeros[g * (N / 8) + n / 8]);
          zero_f[g * N + n] = static_cast<float>((packed >> (4 * (n % 8))) & 15u) + zero_offset;
        }
    }
  }

  // The word of packed row r, column n; the columns after it up to the end of n's 64-column block (blocked) or of
  // the row (checkpoint layout) follow it in memory. Callers read at most 16 columns from a multiple of 16 (of 8
  // for 8), 32 from a multiple of 32, or 64 from a multiple of 64, so they never cross a block.
  const int32_t* q_at(int64_t r, int64_t n) const {
    return blocked ? qweight + (n / kInt4BlockCols) * (K / 8) * kInt4BlockCols + r * kInt4BlockCols +
                         n % kInt4BlockCols
                   : qweight + r * N + n;
  }
  // Column slices handed to threads start at multiples of this (a blocked slice must start on a block).
  int64_t column_unit(int64_t unit) const { return blocked ? std::max<int64_t>(unit, kInt4BlockCols) : unit; }

  float scale_at(int64_t i) const {
    switch (scale_type) {
      case at::kFloat: return static_cast<const float*>(scales)[i];
      case at::kBFloat16: return to_float(static_cast<const BFloat16*>(scales)[i]);
      default: return to_float(static_cast<const Half*>(scales)[i]);
    }
  }

  int64_t num_runs() const { return runs.empty() ? 0 : static_cast<int64_t>(runs.size()) - 1; }

  // Makes a grouped weight (num_runs() > 0) safe to keep past the call that prepared it: the kernels index scales
  // and qzeros by g_idx's values, checked once in prepare(), so a kept weight reads a copy of them that nobody else
  // can write. The common g_idx[k] = k / group_size shares one copy per (K, group_size) for the process.
  void own_g_idx();

  // Per x row, the sum of its inputs over each run (the grouped path's zero correction). [M, num_runs]
  std::vector<float> row_sums(const float* x, int64_t M, int64_t ldx) const {
    const int64_t R = num_runs();
    std::vector<float> sums(M * R, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t run = 0; run < R; ++run) {
        float s = 0.f;
        for (int64_t k = 8 * runs[run]; k < 8 * runs[run + 1]; ++k) s += x[m * ldx + k];
        sums[m * R + run] = s;
      }
    return sums;
  }
};

inline void Int4Weight::own_g_idx() {
  TORCH_CHECK(num_runs() > 0, "Int4Weight::own_g_idx: only grouped weights with inputs are kept");
  const int64_t size = 8 * runs[1];  // the first run's inputs: the group size when g_idx is k / group_size
  bool common = true;
  for (int64_t k = 0; k < K && common; ++k) common = g_idx[k] == k / size;
  if (!common) {
    g_idx_t = g_idx_t.clone();
  } else {
    static std::mutex mu;
    static std::map<std::pair<int64_t, int64_t>, at::Tensor> shared;  // never written after it is made
    std::lock_guard<std::mutex> lock(mu);
    at::Tensor& t = shared[{K, size}];
    if (!t.defined()) t = g_idx_t.clone();
    g_idx_t = t;
  }
  g_idx = g_idx_t.data_ptr<int32_t>();
}

// What a kept Int4Weight saw of one of its four tensors when it was prepared: its memory, dtype, version (which
// every in-place write through the tensor or a view of it advances), shape and strides. While all four still
// match, the weight's pointers and run boundaries are the ones prepare() would compute again. `param.data = ...`
// advances no version but gives the tensor other memory; should new memory land at the old address with the same
// shape, the weight reads it in place all the same (qweight, qzeros and scales are read live), and g_idx, whose
// values the weight keeps a copy of, has its old memory held by the cache so that nothing else can land there.
struct TensorState {
  static constexpr int kMaxDim = 4;
  const void* data = nullptr;
  int64_t version = -1;
  int64_t dtype = -1, dim = -1;
  int64_t shape[2 * kMaxDim] = {};  // sizes, then strides

  // Whether a tensor can be tracked: a contiguous CPU tensor with storage (the weight then reads it in place, never
  // a copy that could go stale) whose version is kept (inference tensors have none: their weights are prepared on
  // every call), of at most kMaxDim dimensions.
  static bool trackable(const at::Tensor& t) {
    return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.has_storage() &&
           !t.is_inference() && t.dim() <= kMaxDim && t.is_contiguous();
  }
  explicit TensorState(const at::Tensor& t)
      : data(t.data_ptr()), version(t._version()), dtype(static_cast<int64_t>(t.scalar_type())), dim(t.dim()) {
    for (int64_t i = 0; i < dim; ++i) {
      shape[i] = t.size(i);
      shape[kMaxDim + i] = t.stride(i);
    }
  }
  TensorState() = default;
  bool operator==(const TensorState& o) const {
    bool same = data == o.data && version == o.version && dtype == o.dtype && dim == o.dim;
    for (int i = 0; i < 2 * kMaxDim; ++i) same = same && shape[i] == o.shape[i];
    return same;
  }
};

// Prepared Int4Weights kept between calls for a fixed set of GPTQ tensors (a LayerPack's experts, a
// DecodeLayerPack's q, k, v, o): a decode step of the real shape prepares 15 expert weights a layer, ~1.7 us each
// hot and ~75 us together with caches cold (8% of the int4 block at one token); a kept one is checked in ~1.3 us.
// A slot is prepared on first use, and again whenever one of its tensors no longer matches its TensorState.
// Grouped weights only: the general path's dequantization tables are ~12% of the weight's own size. Safe to share
// between threads (one lock per lookup; a weight in use stays alive while a newer one replaces it).
class Int4WeightCache {
 public:
  explicit Int4WeightCache(size_t slots) : slots_(slots) {}

  // The weight of slot i from tensors t[0..3] (qweight, qzeros, scales, g_idx), prepared by prepare(w) when the
  // slot is empty or stale. A weight that cannot be kept comes back prepared and is not stored.
  template <typename Prepare>
  std::shared_ptr<const Int4Weight> get(size_t i, const at::Tensor* t, Prepare&& prepare) {
    TORCH_CHECK(i < slots_.size(), "Int4WeightCache: slot ", i, " of ", slots_.size());
    bool trackable = true;
    for (int j = 0; j < 4; ++j) trackable = trackable && TensorState::trackable(t[j]);
    if (trackable) {
      // The four states are read before any is compared: their cache misses (in decode, tensor metadata is cold
      // after the step's GBs of weights) overlap instead of queueing one behind another.
      const TensorState now[4] = {TensorState(t[0]), TensorState(t[1]), TensorState(t[2]), TensorState(t[3])};
      std::lock_guard<std::mutex> lock(mu_);
      const Slot& slot = slots_[i];
      if (slot.weight && now[0] == slot.states[0] && now[1] == slot.states[1] && now[2] == slot.states[2] &&
          now[3] == slot.states[3])
        return slot.weight;
    }
    auto w = std::make_shared<Int4Weight>();
    prepare(*w);  // checks every tensor; throws naming the weight
    if (!trackable || w->num_runs() == 0) return w;  // (no inputs, K = 0: nothing to keep)
    w->own_g_idx();
    Slot fresh{w, {TensorState(t[0]), TensorState(t[1]), TensorState(t[2]), TensorState(t[3])}, t[3].storage()};
    std::lock_guard<std::mutex> lock(mu_);
    slots_[i] = std::move(fresh);
    return w;
  }

 private:
  struct Slot {
    std::shared_ptr<const Int4Weight> weight;
    TensorState states[4];
    c10::Storage g_idx_memory;  // kept alive: an equal g_idx data pointer then means the same memory (TensorState)
  };
  std::mutex mu_;
  std::vector<Slot> slots_;
};

// The weight from t[0..3]: kept in `cache` at `slot` where there is a cache, else prepared for this call alone.
template <typename Prepare>
std::shared_ptr<const Int4Weight> kept_or_prepared(Int4WeightCache* cache, size_t slot, const at::Tensor* t,
                                                   Prepare&& prepare) {
  if (cache != nullptr) return cache->get(slot, t, prepare);
  auto w = std::make_shared<Int4Weight>();
  prepare(*w);
  return w;
}

}  // namespace qmoe

#include "int4_vnni.h"  // needs Int4Weight

namespace qmoe {

namespace int4_detail {

template <typename S, int MR>
void grouped(const Int4Weight& w, const S* scales, const float* x, int64_t ldx, const float* xsum, int64_t n0,
             int64_t n1, float* y, int64_t ldy, float* acc) {
  const int64_t width = n1 - n0, R = w.num_runs(), rows = w.K / 8;
  for (int64_t run = 0; run < R; ++run) {
    const int64_t r_begin = w.runs[run], r_end = w.runs[run + 1];
    const int32_t g = w.g_idx[8 * r_begin];
    std::fill(acc, acc + MR * width, 0.f);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const bool ahead = r + kInt4PrefetchRows < rows;
      // Fields 0..6 come out of unpack8_in_place scaled by 16^j: scale x down to match (field 7 is not).
      constexpr float kDown[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576,
                                  1.f / 16777216, 1.f};
      float xr[MR][8];
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 8; ++j) xr[m][j] = x[m * ldx + 8 * r + j] * (kFieldsInPlace ? kDown[j] : 1.f);
      for (int64_t n = n0; n < n1; n += 8) {
        if (ahead && ((n - n0) & 15) == 0) prefetch(w.q_at(r + kInt4PrefetchRows, n));
        V8 q[8];
        unpack8_in_place(w.q_at(r, n), q);
        for (int m = 0; m < MR; ++m) {
          float* a = acc + m * width + (n - n0);
          V8 s0 = v_load(a), s1 = v_zero();  // two chains: half the FMA latency per column block
          s0 = v_fma(q[0], v_set1(xr[m][0]), s0);
          s1 = v_fma(q[1], v_set1(xr[m][1]), s1);
          s0 = v_fma(q[2], v_set1(xr[m][2]), s0);
          s1 = v_fma(q[3], v_set1(xr[m][3]), s1);
          s0 = v_fma(q[4], v_set1(xr[m][4]), s0);
          s1 = v_fma(q[5], v_set1(xr[m][5]), s1);
          s0 = v_fma(q[6], v_set1(xr[m][6]), s0);
          s1 = v_fma(q[7], v_set1(xr[m][7]), s1);
          v_store(a, v_add(s0, s1));
        }
      }
    }
    // y += s * (sum x*q - z * sum x), once per run.
    const S* srow = scales + g * w.N;
    const int32_t* zrow = w.qzeros + g * (w.N / 8);
    for (int64_t n = n0; n < n1; n += 8) {
      const V8 s = scales8(srow + n);
      const V8 z = zeros8(zrow[n / 8], w.zero_offset);
      for (int m = 0; m < MR; ++m) {
        float* o = y + m * ldy + n;
        const V8 centred = v_sub(v_load(acc + m * width + (n - n0)), v_mul(z, v_set1(xsum[m * R + run])));
        v_store(o, v_fma(s, centred, v_load(o)));
      }
    }
  }
}

template <int MR>
void general(const Int4Weight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t r = 0; r < w.K / 8; ++r) {
    for (int64_t n = n0; n < n1; n += 8) {
      V8 q[8];
      unpack8(w.q_at(r, n), q);
      for (int j = 0; j < 8; ++j) {
        const int64_t base = static_cast<int64_t>(w.g_idx[8 * r + j]) * w.N + n;
        q[j] = v_mul(v_sub(q[j], v_load(w.zero_f.data() + base)), v_load(w.scale_f.data() + base));
      }
      for (int m = 0; m < MR; ++m) {
        float* o = y + m * ldy + n;
        V8 a = v_load(o);
        for (int j = 0; j < 8; ++j) a = v_fma(q[j], v_set1(x[m * ldx + 8 * r + j]), a);
        v_store(o, a);
      }
    }
  }
}

template <typename S>
void rows(const Int4Weight& w, const float* x, int64_t M, int64_t ldx, const float* xsum, int64_t n0, int64_t n1,
          float* y, int64_t ldy, bool vnni) {
  const S* scales = static_cast<const S*>(w.scales);
  const int64_t R = w.num_runs();
  std::vector<float> acc(vnni ? 0 : kInt4RowsPerPass * (n1 - n0));
  for (int64_t m0 = 0; m0 < M; m0 += kInt4RowsPerPass) {
    const float* xm = x + m0 * ldx;
    float* ym = y + m0 * ldy;
    const int64_t mr = std::min<int64_t>(kInt4RowsPerPass, M - m0);
#ifdef QMOE_VNNI
    if (vnni && R > 0 && mr == 1 && vnni_row_enabled().load()) {
      grouped_vnni_row<S>(w, scales, xm, n0, n1, ym);
      continue;
    }
#endif
    (void)vnni;
    const float* sm = xsum + m0 * R;
    if (R > 0) {
      switch (mr) {
        case 4: grouped<S, 4>(w, scales, xm, ldx, sm, n0, n1, ym, ldy, acc.data()); break;
        case 3: grouped<S, 3>(w, scales, xm, ldx, sm, n0, n1, ym, ldy, acc.data()); break;
        case 2: grouped<S, 2>(w, scales, xm, ldx, sm, n0, n1, ym, ldy, acc.data()); break;
        default: grouped<S, 1>(w, scales, xm, ldx, sm, n0, n1, ym, ldy, acc.data());
      }
    } else {
      switch (mr) {
        case 4: general<4>(w, xm, ldx, n0, n1, ym, ldy); break;
        case 3: general<3>(w, xm, ldx, n0, n1, ym, ldy); break;
        case 2: general<2>(w, xm, ldx, n0, n1, ym, ldy); break;
        default: general<1>(w, xm, ldx, n0, n1, ym, ldy);
      }
    }
  }
}

// Columns [n, n + 8 NV) of W, all K, as fp32 W^T: buf[k * 8 NV + c] = W[n + c, k]. While it reads each packed row
// it prefetches the same row's columns at `next` (the next tile's first column, or -1): they then arrive while this
// tile computes.
template <int NV>
void dequantize_tile(const Int4Weight& w, int64_t n, float* buf, int64_t next) {
  constexpr int64_t W = 8 * NV;
  const bool grouped = !w.runs.empty();
  for (int64_t r = 0; r < w.K / 8; ++r) {
    if (next >= 0) prefetch(w.q_at(r, next));
    for (int c = 0; c < NV; ++c) {
      const int64_t col = n + 8 * c;
      V8 q[8];
      unpack8(w.q_at(r, col), q);
      V8 s = v_zero(), z = v_zero();
      if (grouped) {  // one group for the whole packed row
        const int64_t g = w.g_idx[8 * r];
        switch (w.scale_type) {
          case at::kFloat: s = scales8(static_cast<const float*>(w.scales) + g * w.N + col); break;
          case at::kBFloat16: s = scales8(static_cast<const BFloat16*>(w.scales) + g * w.N + col); break;
          default: s = scales8(static_cast<const Half*>(w.scales) + g * w.N + col);
        }
        z = zeros8(w.qzeros[g * (w.N / 8) + col / 8], w.zero_offset);
      }
      for (int j = 0; j < 8; ++j) {
        if (!grouped) {
          const int64_t base = static_cast<int64_t>(w.g_idx[8 * r + j]) * w.N + col;
          s = v_load(w.scale_f.data() + base);
          z = v_load(w.zero_f.data() + base);
        }
        v_store(buf + (8 * r + j) * W + 8 * c, v_mul(v_sub(q[j], z), s));
      }
    }
  }
}

// y[m, 0:8 NV] = sum_k x[m, k] buf[k, 0:8 NV] for MR rows of x (row stride ldx): each step loads NV weight vectors
// and broadcasts one x value per row; MR x NV accumulators stay in registers for the whole K.
template <int MR, int NV>
QMOE_KERNEL void tile_gemm(const float* x, int64_t ldx, int64_t K, const float* buf, float* y, int64_t ldy) {
  V8 acc[MR][NV];
  QMOE_UNROLL
  for (int m = 0; m < MR; ++m)
    QMOE_UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = v_zero();
  for (int64_t k = 0; k < K; ++k) {
    V8 wv[NV];
    QMOE_UNROLL
    for (int v = 0; v < NV; ++v) wv[v] = v_load(buf + k * 8 * NV + 8 * v);
    QMOE_UNROLL
    for (int m = 0; m < MR; ++m) {
      const V8 b = v_set1(x[m * ldx + k]);
      QMOE_UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = v_fma(b, wv[v], acc[m][v]);
    }
  }
  QMOE_UNROLL
  for (int m = 0; m < MR; ++m)
    QMOE_UNROLL
    for (int v = 0; v < NV; ++v) v_store(y + m * ldy + 8 * v, acc[m][v]);
}

// Every row of x times one dequantized tile, 6 rows at a time (12 accumulators + 2 weights + 1 broadcast: 15 of
// AVX2's 16 registers at NV = 2).
template <int NV>
void tile_rows(const float* x, int64_t M, int64_t ldx, int64_t K, const float* buf, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tile_gemm<6, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy);
  switch (M - m) {
    case 5: tile_gemm<5, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy); break;
    case 4: tile_gemm<4, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy); break;
    case 3: tile_gemm<3, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy); break;
    case 2: tile_gemm<2, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy); break;
    case 1: tile_gemm<1, NV>(x + m * ldx, ldx, K, buf, y + m * ldy, ldy); break;
    default: break;
  }
}

}  // namespace int4_detail

// W^T rows [k0, k1) (multiples of 8) as fp32: wt[k, n] = W[n, k], row stride N. For many x rows a dequantized
// slab and sgemm beat unpacking the weights once per 4 rows.
inline void int4_dequantize_t(const Int4Weight& w, int64_t k0, int64_t k1, float* wt) {
  for (int64_t r = k0 / 8; r < k1 / 8; ++r) {
    for (int64_t n = 0; n < w.N; n += 8) {
      V8 q[8];
      unpack8(w.q_at(r, n), q);
      for (int j = 0; j < 8; ++j) {
        const int64_t g = w.g_idx[8 * r + j];
        V8 s, z;
        if (w.runs.empty()) {
          s = v_load(w.scale_f.data() + g * w.N + n);
          z = v_load(w.zero_f.data() + g * w.N + n);
        } else {
          switch (w.scale_type) {
            case at::kFloat: s = scales8(static_cast<const float*>(w.scales) + g * w.N + n); break;
            case at::kBFloat16: s = scales8(static_cast<const BFloat16*>(w.scales) + g * w.N + n); break;
            default: s = scales8(static_cast<const Half*>(w.scales) + g * w.N + n);
          }
          z = zeros8(w.qzeros[g * (w.N / 8) + n / 8], w.zero_offset);
        }
        v_store(wt + (8 * r + j - k0) * w.N + n, v_mul(v_sub(q[j], z), s));
      }
    }
  }
}

// y = x @ W^T for many rows: W^T dequantized to fp32 (in parallel over K), then MKL's sgemm.
// x [M, K] contiguous fp32; y fp32 with row stride ldy.
inline void int4_sgemm(const Int4Weight& w, const float* x, int64_t M, float* y, int64_t ldy) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor wt = at::empty({w.K, w.N}, f32);
  float* dst = wt.data_ptr<float>();
  at::parallel_for(0, w.K / 8, 16, [&](int64_t b, int64_t e) { int4_dequantize_t(w, 8 * b, 8 * e, dst + 8 * b * w.N); });
  at::Tensor xm = at::from_blob(const_cast<float*>(x), {M, w.K}, f32);
  at::Tensor ym = at::from_blob(y, {M, w.N}, {ldy, 1}, f32);
  at::mm_out(ym, xm, wt);
}

// y = x @ W^T for many rows on a CPU with native bf16 matmul: W^T dequantized to fp32 (in parallel over K), rounded
// to bf16, then oneDNN's bf16 matmul (AMX). The rounding of W is bf16's, below the 4-bit grid's own.
inline void int4_native_mm(const Int4Weight& w, const float* x, int64_t M, float* y, int64_t ldy) {
  at::Tensor wt = at::empty({w.K, w.N}, at::TensorOptions().dtype(at::kFloat));
  float* dst = wt.data_ptr<float>();
  at::parallel_for(0, w.K / 8, 16, [&](int64_t b, int64_t e) { int4_dequantize_t(w, 8 * b, 8 * e, dst + 8 * b * w.N); });
  native_bf16_mm(x, M, w.K, wt.to(at::kBFloat16), /*transposed=*/false, y, w.N, ldy);
}

// y[m, n] = sum_k x[m, k] W[n, k] for m < M, n in [n0, n1) (multiples of 8) by dequantized tiles of 16 columns
// (8 for a last odd block); x fp32 with row stride ldx, y fp32 with row stride ldy (overwritten).
inline void int4_tiles(const Int4Weight& w, const float* x, int64_t M, int64_t ldx, int64_t n0, int64_t n1,
                       float* y, int64_t ldy) {
  std::vector<float> buf(w.K * 16);
  for (int64_t n = n0; n < n1;) {
    const int64_t width = n + 16 <= n1 ? 16 : 8;
    const int64_t next = n + width < n1 ? n + width : -1;
    if (width == 16) {
      int4_detail::dequantize_tile<2>(w, n, buf.data(), next);
      int4_detail::tile_rows<2>(x, M, ldx, w.K, buf.data(), y + n, ldy);
    } else {
      int4_detail::dequantize_tile<1>(w, n, buf.data(), next);
      int4_detail::tile_rows<1>(x, M, ldx, w.K, buf.data(), y + n, ldy);
    }
    n += width;
  }
}

// y[m, n] = sum_k x[m, k] W[n, k] for m < M, n in [n0, n1) (multiples of 8); x fp32 with row stride ldx,
// xsum = w.row_sums(x, M, ldx), y fp32 with row stride ldy (overwritten).
// vnni: integer dot products on int8-quantized x (int4_vnni.h; 16-bit activations, grouped weights only).
inline void int4_rows_times_weight(const Int4Weight& w, const float* x, int64_t M, int64_t ldx, const float* xsum,
                                   int64_t n0, int64_t n1, float* y, int64_t ldy, bool vnni = false) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.f);
  switch (w.scale_type) {
    case at::kFloat: return int4_detail::rows<float>(w, x, M, ldx, xsum, n0, n1, y, ldy, vnni);
    case at::kBFloat16: return int4_detail::rows<BFloat16>(w, x, M, ldx, xsum, n0, n1, y, ldy, vnni);
    default: return int4_detail::rows<Half>(w, x, M, ldx, xsum, n0, n1, y, ldy, vnni);
  }
}

#ifdef QMOE_VNNI
// y[m, n] = sum_k x[m, k] W[n, k] for every row of x (quantized in `a`), n in [n0, n1); y overwritten there.
inline void int4_vnni_rows(const Int4Weight& w, const VnniActs& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t m = 0; m < a.M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.f);
  switch (w.scale_type) {
    case at::kFloat: return grouped_vnni<float>(w, static_cast<const float*>(w.scales), a, n0, n1, y, ldy);
    case at::kBFloat16: return grouped_vnni<BFloat16>(w, static_cast<const BFloat16*>(w.scales), a, n0, n1, y, ldy);
    default: return grouped_vnni<Half>(w, static_cast<const Half*>(w.scales), a, n0, n1, y, ldy);
  }
}
#endif

// The ways int4_matmul computes a product, by rows of x (M), in the order it tries them.
enum class Int4Path { kOneDnn, kSgemm, kTiles, kVnni, kRows };

inline const char* int4_path_name(Int4Path p) {
  switch (p) {
    case Int4Path::kOneDnn: return "onednn";
    case Int4Path::kSgemm: return "sgemm";
    case Int4Path::kTiles: return "tiles";
    case Int4Path::kVnni: return "vnni";
    default: return "rows";
  }
}

// The dtype x's values came from (the kernels get them as fp32). A path that rounds x may take x only where that
// rounding stays below the dtype's own: VNNI's two int8 planes (an error of at most 1/64516 of a group run's
// max|x|, against fp16's 1/2048 and bf16's 1/256 of each value) for fp16 and bf16 activations; oneDNN's bf16
// matmul (x and W rounded to bf16) for bf16 activations only.
enum class Int4Act { kFloat, kHalf, kBFloat16 };

inline Int4Act int4_act(at::ScalarType t) {
  return t == at::kBFloat16 ? Int4Act::kBFloat16 : t == at::kHalf ? Int4Act::kHalf : Int4Act::kFloat;
}

// The path for M rows of x against a weight with K inputs (grouped: g_idx = k // G runs), x from `act`.
inline Int4Path int4_path(int64_t M, int64_t K, bool grouped, Int4Act act) {
  const int64_t native = act == Int4Act::kBFloat16 ? native_rows(NativeKind::kInt4Weights) : 0;
  if (native > 0 && M >= native) return Int4Path::kOneDnn;
  if (kHaveVnni && act != Int4Act::kFloat && grouped && vnni_enabled().load()) return Int4Path::kVnni;
  if (M >= kInt4SgemmRows) return Int4Path::kSgemm;
  if (M >= (K > 4096 ? kInt4TileRowsLongK : kInt4TileRows)) return Int4Path::kTiles;
  return Int4Path::kRows;
}

// int4_matmul's cut of w's columns into `slices` contiguous slices of whole `unit`-column blocks.
struct ColumnSlices {
  int64_t unit, blocks, slices;
  ColumnSlices(const Int4Weight& w, int64_t unit_cols, int64_t threads)
      : unit(w.column_unit(unit_cols)), blocks((w.N + unit - 1) / unit),
        slices(std::max<int64_t>(1, std::min<int64_t>(threads, blocks))) {}
  // Columns [n0, n1) of slice s.
  int64_t n0(int64_t s) const { return unit * (blocks * s / slices); }
  int64_t n1(const Int4Weight& w, int64_t s) const { return std::min(w.N, unit * (blocks * (s + 1) / slices)); }
};

// y = x @ W^T (x [M, K] contiguous fp32, y fp32 with row stride ldy), by the path for M (int4_path), on all
// threads. Column slices are contiguous, one per thread: each walks qweight's rows front to back.
inline void int4_matmul(const Int4Weight& w, const float* x, int64_t M, float* y, int64_t ldy,
                        Int4Act act = Int4Act::kFloat) {
  if (M <= 0 || w.N <= 0) return;
  if (w.K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy, y + m * ldy + w.N, 0.f);
    return;
  }
  const Int4Path path = int4_path(M, w.K, !w.runs.empty(), act);
  if (path == Int4Path::kOneDnn) return int4_native_mm(w, x, M, y, ldy);
  if (path == Int4Path::kSgemm) return int4_sgemm(w, x, M, y, ldy);
  const bool tiles = path == Int4Path::kTiles, vnni = path == Int4Path::kVnni;
  // VNNI: one row (a decode step) takes grouped_vnni_row, which quantizes x itself; more rows share x's planes,
  // made once here rather than once per thread.
  const bool vnni_row = vnni && M == 1 && vnni_row_enabled().load();
#ifdef QMOE_VNNI
  std::unique_ptr<VnniActs> acts(vnni && !vnni_row ? new VnniActs(w, x, M, w.K) : nullptr);
#endif
  const std::vector<float> sums = tiles || vnni ? std::vector<float>() : w.row_sums(x, M, w.K);
  const ColumnSlices cut(w, tiles ? 16 : 8, at::get_num_threads());  // blocks of a tile, or one packed int32's
  at::parallel_for(0, cut.slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t n0 = cut.n0(s), n1 = cut.n1(w, s);
      if (tiles) int4_tiles(w, x, M, w.K, n0, n1, y, ldy);
#ifdef QMOE_VNNI
      else if (acts) int4_vnni_rows(w, *acts, n0, n1, y, ldy);
#endif
      else int4_rows_times_weight(w, x, M, w.K, sums.data(), n0, n1, y, ldy, vnni_row);
    }
  });
}

// One row of x against each of several weights (each with its own x row and output row) in one parallel region:
// the weights' column blocks taken together, each thread one contiguous slice of them, so that a thread walks long
// runs of packed rows and the region starts once rather than once per weight (a GPTQ attention layer's q, k, v in
// gptq_linears_cpu; the MoE op's one-row jobs measured slower this way, see run_int4_jobs). Each output is what
// int4_matmul gives for that row, bit for bit.
struct Int4RowJob {
  const Int4Weight* w;
  const float* x;  // [K] fp32
  float* y;        // [N] fp32, overwritten
};

// y[n0, n1) = x . W for one row on the VNNI row kernel (the path int4_row_in_region picks), with x's planes from
// the thread's RowActs; without VNNI (never reached there: int4_row_in_region is false) int4_rows_times_weight.
struct RowJobRunner {
#ifdef QMOE_VNNI
  RowActs acts;
#endif
  void operator()(const Int4RowJob& job, int64_t n0, int64_t n1) {
    const Int4Weight& w = *job.w;
#ifdef QMOE_VNNI
    const VnniActs& a = acts.get(w, job.x);
    std::fill(job.y + n0, job.y + n1, 0.f);
    switch (w.scale_type) {
      case at::kFloat: return grouped_vnni_row<float>(w, static_cast<const float*>(w.scales), a, n0, n1, job.y);
      case at::kBFloat16:
        return grouped_vnni_row<BFloat16>(w, static_cast<const BFloat16*>(w.scales), a, n0, n1, job.y);
      default: return grouped_vnni_row<Half>(w, static_cast<const Half*>(w.scales), a, n0, n1, job.y);
    }
#else
    int4_rows_times_weight(w, job.x, 1, w.K, nullptr, n0, n1, job.y, w.N, /*vnni=*/true);
#endif
  }
};

// Whether a one-row product with w takes int4_rows_one_region (the VNNI row kernel's path) rather than int4_matmul.
inline bool int4_row_in_region(const Int4Weight& w, Int4Act act) {
  return w.K > 0 && w.N > 0 && vnni_row_enabled().load() &&
         int4_path(1, w.K, !w.runs.empty(), act) == Int4Path::kVnni;
}

// Every job must pass int4_row_in_region.
inline void int4_rows_one_region(const std::vector<Int4RowJob>& jobs) {
  const int64_t L = static_cast<int64_t>(jobs.size());
  std::vector<int64_t> first{0};  // first global block of each job, + the total
  std::vector<int64_t> unit(L);
  for (int64_t i = 0; i < L; ++i) {
    unit[i] = jobs[i].w->column_unit(8);
    first.push_back(first.back() + (jobs[i].w->N + unit[i] - 1) / unit[i]);
  }
  const int64_t blocks = first.back();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    RowJobRunner run;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b0 = blocks * s / slices, b1 = blocks * (s + 1) / slices;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
        if (lo >= hi) continue;
        const Int4Weight& w = *jobs[i].w;
        const int64_t n0 = unit[i] * (lo - first[i]), n1 = std::min(w.N, unit[i] * (hi - first[i]));
        run(jobs[i], n0, n1);
      }
    }
  });
}

// The same jobs (each must pass int4_row_in_region) in one parallel region, each thread taking int4_matmul's own
// column slice of every job in turn: both threads stream the same weight at once, as one job at a time does, but
// a thread done with its slice goes on to the next weight instead of waiting at a barrier per job. The MoE op's
// decode step (its experts' gate, up and down projections): the int4 block at 1 token 1.00-1.05x against one
// int4_matmul per job. Same slices, same kernel: bit for bit int4_matmul's.
inline void int4_rows_each_sliced(const std::vector<Int4RowJob>& jobs) {
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    RowJobRunner run;
    for (int64_t t = t0; t < t1; ++t) {
      for (const Int4RowJob& job : jobs) {
        const Int4Weight& w = *job.w;
        const ColumnSlices cut(w, 8, threads);
        if (t < cut.slices) run(job, cut.n0(t), cut.n1(w, t));
      }
    }
  });
}

}  // namespace qmoe
