// y = x @ W^T for a GPTQ 4-bit Linear on CPU, reading the checkpoint's own packed layout (no repacking, so the
// module's state dict stays the checkpoint's tensors and nothing is held twice).
//
// Why not torch's _weight_int4pack_mm_for_cpu: its packed layout depends on the CPU's vector width (it cannot be
// saved or read back portably) and on this AVX2 machine it ran slower than bf16 at one row.
//
// Contract (schema in qwen2_moe_hf/gptq/ops.py):
//   gptq_linear_cpu(x [M,K] float/bf16/fp16, qweight [K/8,N] int32, qzeros [G,N/8] int32, scales [G,N] float,
//                   g_idx [K] int32, zero_offset, bias [N]?) -> [M,N] in x's dtype
//   W[n,k] = scales[g,n] * (q[k,n] - (z[g,n] + zero_offset)), g = g_idx[k], q / z the 4-bit fields.
//   Accumulation is fp32 and runs in a fixed order, whatever the thread count.
//
// Two paths:
//   grouped (every packed row of 8 inputs lies in one group: g_idx = k // G with G a multiple of 8, the common
//     case): sum x*q over a group first and apply its scale and zero once:
//     y[n] += s[g,n] * (sum_k x[k] q[k,n] - z[g,n] * sum_k x[k]), so the inner loop is unpack + FMA only;
//   general (act-order g_idx): dequantize each weight with its own group's scale and zero.
// Each thread owns a contiguous slice of the output columns and walks qweight rows, so reads stream; x rows go
// 4 at a time over a group's slab of weights while it sits in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec.h"

namespace {

using namespace qmoe;

constexpr int kRowsPerPass = 4;  // x rows sharing one unpack of the weights

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
// The 8 nibbles of 8 packed int32 (8 columns): w[j] = field j of each column, as floats.
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
// The 8 zeros one qzeros int32 holds (columns 8c .. 8c+7), plus the format's offset.
inline V8 zeros8(int32_t packed, float offset) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(packed), shifts), _mm256_set1_epi32(15));
  return _mm256_add_ps(_mm256_cvtepi32_ps(z), _mm256_set1_ps(offset));
}
template <typename S>
inline V8 scales8(const S* p) { return load8(p); }
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
#endif

struct Problem {
  const float* x;  // [M, K] fp32
  int64_t M, K, N;
  const int32_t* qweight;  // [K/8, N]
  const int32_t* qzeros;   // [G, N/8]
  const int32_t* g_idx;    // [K]
  float zero_offset;
  float* out;  // [M, N] fp32, zero-initialised
};

// Packed-row runs [begin, end) of one group each; empty when some packed row mixes groups (act-order).
std::vector<int64_t> group_runs(const int32_t* g_idx, int64_t K) {
  std::vector<int64_t> starts;
  for (int64_t r = 0; r < K / 8; ++r) {
    const int32_t g = g_idx[8 * r];
    for (int j = 1; j < 8; ++j)
      if (g_idx[8 * r + j] != g) return {};
    if (r == 0 || g_idx[8 * (r - 1)] != g) starts.push_back(r);
  }
  starts.push_back(K / 8);
  return starts;
}

// Grouped path, x rows [m0, m0 + MR), output columns [n0, n1) (multiples of 8).
template <typename S, int MR>
void grouped_slice(const Problem& p, const S* scales, const std::vector<int64_t>& runs, const float* xsum,
                   int64_t m0, int64_t n0, int64_t n1, float* acc) {
  const int64_t width = n1 - n0;
  for (size_t run = 0; run + 1 < runs.size(); ++run) {
    const int64_t r_begin = runs[run], r_end = runs[run + 1];
    const int32_t g = p.g_idx[8 * r_begin];
    std::fill(acc, acc + MR * width, 0.f);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int32_t* qrow = p.qweight + r * p.N;
      float xr[MR][8];
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 8; ++j) xr[m][j] = p.x[(m0 + m) * p.K + 8 * r + j];
      for (int64_t n = n0; n < n1; n += 8) {
        V8 w[8];
        unpack8(qrow + n, w);
        for (int m = 0; m < MR; ++m) {
          float* a = acc + m * width + (n - n0);
          V8 s0 = v_load(a), s1 = v_zero();  // two chains: half the FMA latency per column block
          s0 = v_fma(w[0], v_set1(xr[m][0]), s0);
          s1 = v_fma(w[1], v_set1(xr[m][1]), s1);
          s0 = v_fma(w[2], v_set1(xr[m][2]), s0);
          s1 = v_fma(w[3], v_set1(xr[m][3]), s1);
          s0 = v_fma(w[4], v_set1(xr[m][4]), s0);
          s1 = v_fma(w[5], v_set1(xr[m][5]), s1);
          s0 = v_fma(w[6], v_set1(xr[m][6]), s0);
          s1 = v_fma(w[7], v_set1(xr[m][7]), s1);
          v_store(a, v_add(s0, s1));
        }
      }
    }
    // y += s * (sum x*q - z * sum x), once per group.
    const S* srow = scales + g * p.N;
    const int32_t* zrow = p.qzeros + g * (p.N / 8);
    for (int64_t n = n0; n < n1; n += 8) {
      const V8 s = scales8(srow + n);
      const V8 z = zeros8(zrow[n / 8], p.zero_offset);
      for (int m = 0; m < MR; ++m) {
        float* o = p.out + (m0 + m) * p.N + n;
        const V8 dot = v_load(acc + m * width + (n - n0));
        const V8 centred = v_sub(dot, v_mul(z, v_set1(xsum[(m0 + m) * (runs.size() - 1) + run])));
        v_store(o, v_fma(s, centred, v_load(o)));
      }
    }
  }
}

// General path (act-order): every weight dequantized with its own group's scale and zero.
template <typename S, int MR>
void general_slice(const Problem& p, const float* scale_f, const float* zero_f, int64_t m0, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < p.K / 8; ++r) {
    const int32_t* qrow = p.qweight + r * p.N;
    for (int64_t n = n0; n < n1; n += 8) {
      V8 w[8];
      unpack8(qrow + n, w);
      for (int j = 0; j < 8; ++j) {
        const int64_t k = 8 * r + j;
        const int64_t base = static_cast<int64_t>(p.g_idx[k]) * p.N + n;
        w[j] = v_mul(v_sub(w[j], v_load(zero_f + base)), v_load(scale_f + base));
      }
      for (int m = 0; m < MR; ++m) {
        float* o = p.out + (m0 + m) * p.N + n;
        V8 a = v_load(o);
        for (int j = 0; j < 8; ++j) a = v_fma(w[j], v_set1(p.x[(m0 + m) * p.K + 8 * r + j]), a);
        v_store(o, a);
      }
    }
  }
}

template <typename S, int MR>
void run_rows(const Problem& p, const S* scales, const std::vector<int64_t>& runs, const float* xsum,
              const float* scale_f, const float* zero_f, int64_t m0, int64_t n0, int64_t n1, float* acc) {
  if (!runs.empty())
    grouped_slice<S, MR>(p, scales, runs, xsum, m0, n0, n1, acc);
  else
    general_slice<S, MR>(p, scale_f, zero_f, m0, n0, n1);
}

template <typename S>
void compute(const Problem& p, const S* scales, int64_t groups) {
  const std::vector<int64_t> runs = group_runs(p.g_idx, p.K);
  std::vector<float> xsum, scale_f, zero_f;
  if (!runs.empty()) {
    const int64_t nruns = static_cast<int64_t>(runs.size()) - 1;
    xsum.assign(p.M * nruns, 0.f);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t run = 0; run < nruns; ++run) {
        float s = 0.f;
        for (int64_t k = 8 * runs[run]; k < 8 * runs[run + 1]; ++k) s += p.x[m * p.K + k];
        xsum[m * nruns + run] = s;
      }
  } else {
    scale_f.resize(groups * p.N);
    zero_f.resize(groups * p.N);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t n = 0; n < p.N; ++n) {
        scale_f[g * p.N + n] = to_float(scales[g * p.N + n]);
        const uint32_t packed = static_cast<uint32_t>(p.qzeros[g * (p.N / 8) + n / 8]);
        zero_f[g * p.N + n] = static_cast<float>((packed >> (4 * (n % 8))) & 15u) + p.zero_offset;
      }
  }
  // One contiguous slice of columns per thread: each walks qweight rows front to back.
  const int64_t blocks = p.N / 8;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t n0 = 8 * (blocks * slice / slices), n1 = 8 * (blocks * (slice + 1) / slices);
      std::vector<float> acc(kRowsPerPass * (n1 - n0));
      for (int64_t m0 = 0; m0 < p.M; m0 += kRowsPerPass) {
        const int64_t mr = std::min<int64_t>(kRowsPerPass, p.M - m0);
        const float* xs = xsum.data();
        switch (mr) {
          case 4: run_rows<S, 4>(p, scales, runs, xs, scale_f.data(), zero_f.data(), m0, n0, n1, acc.data()); break;
          case 3: run_rows<S, 3>(p, scales, runs, xs, scale_f.data(), zero_f.data(), m0, n0, n1, acc.data()); break;
          case 2: run_rows<S, 2>(p, scales, runs, xs, scale_f.data(), zero_f.data(), m0, n0, n1, acc.data()); break;
          default: run_rows<S, 1>(p, scales, runs, xs, scale_f.data(), zero_f.data(), m0, n0, n1, acc.data());
        }
      }
    }
  });
}

at::Tensor gptq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, int64_t zero_offset,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "gptq_linear_cpu: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "gptq_linear_cpu: qweight must be int32 [K/8, N]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1);
  TORCH_CHECK(qweight.size(0) * 8 == K, "gptq_linear_cpu: qweight has ", qweight.size(0), " rows, x has K=", K,
              " (expected K/8 = ", K / 8, ")");
  TORCH_CHECK(N % 8 == 0, "gptq_linear_cpu: out_features ", N, " is not a multiple of 8");
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == N, "gptq_linear_cpu: scales must be [G, ", N, "], got ",
              scales.sizes());
  const int64_t groups = scales.size(0);
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.scalar_type() == at::kInt && qzeros.size(0) == groups &&
                  qzeros.size(1) * 8 == N,
              "gptq_linear_cpu: qzeros must be int32 [", groups, ", ", N / 8, "], got ", qzeros.sizes());
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.size(0) == K && g_idx.scalar_type() == at::kInt,
              "gptq_linear_cpu: g_idx must be int32 [", K, "]");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "gptq_linear_cpu: tensors must be on the CPU");
  const at::Tensor gi = g_idx.contiguous();
  if (K > 0) {
    const auto lo = gi.min().item<int32_t>(), hi = gi.max().item<int32_t>();
    TORCH_CHECK(lo >= 0 && hi < groups, "gptq_linear_cpu: g_idx spans [", lo, ", ", hi, "], scales have ", groups,
                " groups");
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0 && K > 0) {
    Problem p{xf.data_ptr<float>(), M, K, N, qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), gi.data_ptr<int32_t>(),
              static_cast<float>(zero_offset), out.data_ptr<float>()};
    switch (sc.scalar_type()) {
      case at::kFloat: compute(p, sc.data_ptr<float>(), groups); break;
      case at::kHalf: compute(p, sc.data_ptr<at::Half>(), groups); break;
      case at::kBFloat16: compute(p, sc.data_ptr<at::BFloat16>(), groups); break;
      default: TORCH_CHECK(false, "gptq_linear_cpu: scales dtype ", sc.scalar_type(), " (float32/float16/bfloat16)");
    }
  }
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) { m.impl("gptq_linear_cpu", &gptq_linear_cpu); }
