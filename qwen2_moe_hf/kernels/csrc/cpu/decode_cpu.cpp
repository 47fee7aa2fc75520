// The small pieces of a decode step around the MoE blocks, each one pass over its data instead of a chain of
// eager torch ops (docs/benchmarks.md, "Where a decode step goes"):
//
//   decode_attention_cpu(query [B,H,1,D], key [B,KVH,L,D], value [B,KVH,L,D], mask?, scaling) -> [B,1,H,D]
//       softmax(q k^T * scaling + mask) v for ONE query position per sequence (a decode step), query head h reading
//       key/value head h / (H / KVH) (grouped-query attention without repeat_kv). mask: boolean (True = may attend)
//       or additive (float / bf16 / fp16), broadcastable to [B, H, 1, L]. Sums, softmax and the weighted sum of v
//       in fp32; the output rounded once to query's dtype, in transformers' attention-output layout. A row that
//       may attend to nothing gives zeros. torch's scaled_dot_product_attention took 1.75 us per cached position
//       and layer for bf16 here (455 us at 256 positions, 16 heads of 128: its flash kernel blocks for many
//       queries); this reads each cached key and value once.
//   rms_norm_cpu(x [..., N], weight [N], eps) -> [..., N]
//       weight * (x / sqrt(mean(x^2) + eps)) with the released model's roundings: normalised in fp32, rounded to
//       x's dtype, multiplied by weight (same dtype as x) and rounded again; one op instead of eight.
//   rope_cpu(query [B,H,L,D], key [B,KVH,L,D], cos [B or 1,L,D], sin [B or 1,L,D]) -> (query', key')
//       x * cos + rotate_half(x) * sin for both, rotate_half(x) = cat(-x[D/2:], x[:D/2]), with the model's roundings
//       (each product rounded to x's dtype, then their sum): bit for bit apply_rotary_pos_emb's eight eager ops per
//       tensor, in one op. Outputs contiguous. query and key are read with any strides (a projection's transposed
//       view is not copied).
//
// Every tensor is checked at the boundary (common/checks.h): CPU, dtype, shape. key and value are read in place
// with any strides whose last one is 1 (a KV cache is not copied); other layouts are copied first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "decode_ops.h"
#include "vec.h"

namespace {

using qmoe::TensorArg;
using qmoe::with_floating;
using qmoe::to_float;

const at::Device kCpu(at::kCPU);

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#ifdef QMOE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), qmoe::load8(k + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), qmoe::load8(k + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), qmoe::load8(k + d), acc0);
  s = qmoe::hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

// acc[0:D] += p * v[0:D]
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t D) {
  int64_t d = 0;
#ifdef QMOE_AVX2
  const __m256 pv = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, qmoe::load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < D; ++d) acc[d] += p * to_float(v[d]);
}

// s[0:L] = exp(s - m), returns their sum; -inf entries give 0.
inline float exp_sum(float* s, int64_t L, float m) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef QMOE_AVX2
  const __m256 mv = _mm256_set1_ps(m), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= L; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    // exp8 clamps its argument, so a masked (-inf) score is zeroed explicitly.
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), qmoe::exp8(_mm256_sub_ps(x, mv)));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = qmoe::hsum(acc);
#endif
  for (; j < L; ++j) {
    s[j] = std::exp(s[j] - m);  // exp(-inf) = 0
    sum += s[j];
  }
  return sum;
}

// Attends to positions [0, L) of k and v (which may hold more).
template <typename T>
void attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t L, const at::Tensor& mask,
                    bool bool_mask, float scaling, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1);
  const int64_t group = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool masked = mask.defined();
  const uint8_t* mb = masked && bool_mask ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const float* mf = masked && !bool_mask ? mask.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), s(L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / group;
      const T* qrow = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qf[d] = to_float(qrow[d * q.stride(3)]) * scaling;
      const T* kb = kp + b * k.stride(0) + g * k.stride(1);
      const T* vb = vp + b * v.stride(0) + g * v.stride(1);
      const int64_t m_off = masked ? b * mask.stride(0) + h * mask.stride(1) : 0;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        float score;
        if (mb != nullptr && !mb[m_off + j * mask.stride(3)]) {
          score = -std::numeric_limits<float>::infinity();
        } else {
          score = dot(qf.data(), kb + j * k.stride(2), D);
          if (mf != nullptr) score += mf[m_off + j * mask.stride(3)];
        }
        s[j] = score;
        top = std::isnan(score) || score > top ? score : top;  // NaN wins: it must reach the output
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      T* orow = op + (b * H + h) * D;  // out is [B, 1, H, D], contiguous
      if (top == -std::numeric_limits<float>::infinity() || std::isnan(top)) {  // nothing to attend to, or NaN
        const float fill = std::isnan(top) ? top : 0.f;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(fill);
        continue;
      }
      const float total = exp_sum(s.data(), L, top);
      for (int64_t j = 0; j < L; ++j) {
        if (s[j] != 0.f) axpy(acc.data(), s[j], vb + j * v.stride(2), D);  // 0: masked (or underflowed)
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

}  // namespace

namespace qmoe {

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const c10::optional<at::Tensor>& mask, double scaling) {
  return decode_attention_prefix(query, key, value, -1, mask, scaling);
}

at::Tensor decode_attention_prefix(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   int64_t length, const c10::optional<at::Tensor>& mask, double scaling) {
  const char* op = "decode_attention_cpu";
  TensorArg(query, op, "query", kCpu).floating().dim(4).sizes({-1, -1, 1, -1});
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3);
  TensorArg(key, op, "key", kCpu).dtype(query.scalar_type()).dim(4).sizes({B, -1, -1, D}, "query");
  const int64_t KVH = key.size(1);
  TORCH_CHECK(length >= -1 && length <= key.size(2), op, ": length must be -1 (all of key) or in [0, ",
              key.size(2), "] (key's positions), got ", length);
  const int64_t L = length < 0 ? key.size(2) : length;
  TORCH_CHECK(KVH > 0 ? H % KVH == 0 : H == 0, op, ": query has ", H, " heads, key has ", KVH,
              " (query heads must be a multiple of key/value heads)");
  TensorArg(value, op, "value", kCpu).dtype(query.scalar_type()).dim(4).sizes({B, KVH, key.size(2), D}, "key");
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  // Rows are read in place; only a layout whose last stride is not 1 is copied.
  const at::Tensor k = key.stride(3) == 1 || D <= 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 || D <= 1 ? value : value.contiguous();
  at::Tensor m;
  bool bool_mask = false;
  if (mask.has_value() && mask->defined()) {
    TensorArg(*mask, op, "mask", kCpu)
        .dtype({at::kBool, at::kFloat, at::kBFloat16, at::kHalf}, "torch.bool or a floating dtype")
        .dim(4);
    const at::Tensor& given = *mask;
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t want = i == 0 ? B : i == 1 ? H : i == 2 ? 1 : L;
      TORCH_CHECK(given.size(i) == want || given.size(i) == 1, op, ": mask must be broadcastable to [", B, ", ", H,
                  ", 1, ", L, "] (query's batch and heads, key's length), got shape ", given.sizes());
    }
    bool_mask = given.scalar_type() == at::kBool;
    m = (bool_mask ? given : given.to(at::kFloat)).expand({B, H, 1, L});
  }
  at::Tensor out = at::empty({B, 1, H, D}, query.options());
  if (out.numel() == 0) return out;
  if (L == 0) return out.zero_();  // nothing to attend to
  with_floating(query.scalar_type(), [&](auto tag) {
    attention_rows<decltype(tag)>(query, k, v, L, m, bool_mask, static_cast<float>(scaling), out);
  });
  return out;
}

}  // namespace qmoe

namespace {

template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t N, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));  // one thread for a decode row
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      int64_t n = 0;
      float ss = 0.f;
#ifdef QMOE_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (; n + 8 <= N; n += 8) {
        const __m256 v = qmoe::load8(xr + n);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      ss = qmoe::hsum(acc);
#endif
      for (; n < N; ++n) ss += to_float(xr[n]) * to_float(xr[n]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
      // Two roundings, as the model's torch code does: (x * inv) to x's dtype, then weight * that to x's dtype.
      for (n = 0; n < N; ++n) yr[n] = static_cast<T>(to_float(w[n]) * to_float(static_cast<T>(to_float(xr[n]) * inv)));
    }
  });
}

}  // namespace

namespace qmoe {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm_cpu";
  TensorArg xa(x, op, "x", kCpu);
  xa.floating();
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-D tensor");
  const int64_t N = x.size(-1);
  const at::Tensor w = TensorArg(weight, op, "weight", kCpu).dtype(x.scalar_type()).sizes({N}, "x's last dimension")
                           .contiguous();
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor xc = xa.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (y.numel() == 0) return y;
  with_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(xc.data_ptr<T>(), w.data_ptr<T>(), y.data_ptr<T>(), xc.numel() / N, N, static_cast<float>(eps));
  });
  return y;
}

}  // namespace qmoe

namespace {

// Products and sums as eager torch rounds them: each one rounded to T. For float, products must not be fused into
// the add (an FMA would round once where torch rounds twice).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
void rope_rows(const at::Tensor& x, const T* cos, const T* sin, int64_t cos_batch_stride, at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), half = D / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));  // one thread for a decode step
  at::parallel_for(0, B * H * L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * L), h = i / L % H, l = i % L;
      const T* xr = xp + b * s0 + h * s1 + l * s2;
      const T* c = cos + b * cos_batch_stride + l * D;
      const T* sn = sin + b * cos_batch_stride + l * D;
      T* o = op + i * D;
      for (int64_t d = 0; d < D; ++d) {
        const float v = to_float(xr[d * s3]);
        const float r = d < half ? -to_float(xr[(d + half) * s3]) : to_float(xr[(d - half) * s3]);
        const float a = to_float(static_cast<T>(v * to_float(c[d])));
        const float e = to_float(static_cast<T>(r * to_float(sn[d])));
        o[d] = static_cast<T>(a + e);
      }
    }
  });
}
#pragma GCC pop_options

}  // namespace

namespace qmoe {

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  const char* op = "rope_cpu";
  TensorArg(query, op, "query", kCpu).floating().dim(4);
  const int64_t B = query.size(0), L = query.size(2), D = query.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": query's head_dim (last dimension) must be even, got ", D);
  TensorArg(key, op, "key", kCpu).dtype(query.scalar_type()).dim(4).sizes({B, -1, L, D}, "query");
  TensorArg(cos, op, "cos", kCpu).dtype(query.scalar_type()).dim(3);
  TORCH_CHECK(cos.size(0) == B || cos.size(0) == 1, op, ": cos must have shape [", B, " or 1, ", L, ", ", D,
              "] (query's batch, length and head_dim), got ", cos.sizes());
  const at::Tensor c = TensorArg(cos, op, "cos", kCpu).sizes({cos.size(0), L, D}, "query").contiguous();
  const at::Tensor s = TensorArg(sin, op, "sin", kCpu).dtype(query.scalar_type()).sizes({cos.size(0), L, D}, "cos")
                           .contiguous();
  const int64_t batch_stride = c.size(0) == 1 ? 0 : L * D;
  at::Tensor q_out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor k_out = at::empty(key.sizes(), key.options().memory_format(at::MemoryFormat::Contiguous));
  with_floating(query.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (q_out.numel() > 0) rope_rows<T>(query, c.data_ptr<T>(), s.data_ptr<T>(), batch_stride, q_out);
    if (k_out.numel() > 0) rope_rows<T>(key, c.data_ptr<T>(), s.data_ptr<T>(), batch_stride, k_out);
  });
  return {q_out, k_out};
}

}  // namespace qmoe

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) {
  m.impl("rope_cpu", &qmoe::rope_cpu);
  m.impl("decode_attention_cpu", &qmoe::decode_attention_cpu);
  m.impl("rms_norm_cpu", &qmoe::rms_norm_cpu);
}
