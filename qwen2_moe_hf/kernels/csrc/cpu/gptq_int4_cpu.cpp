// gptq_linear_cpu: y = x @ W^T (+ bias) for one GPTQ 4-bit Linear on CPU (the kernel is int4_gemm.h).
//
// Why not torch's _weight_int4pack_mm_for_cpu: its packed layout depends on the CPU's vector width (it cannot be
// saved or read back portably), and on this AVX2 machine it ran slower than bf16 at one row.
//
// Contract (schema in qwen2_moe_hf/kernels/ops.py):
//   gptq_linear_cpu(x [M,K] float/bf16/fp16, qweight [K/8,N] int32 (or blocked [N/64,K/8,64]: int4_gemm.h),
//                   qzeros [G,N/8] int32, scales [G,N] float, g_idx [K] int32 in [0, G), zero_offset 0 or 1,
//                   bias [N] float?) -> [M,N] in x's dtype
//   gptq_linears_cpu(x [M,K], linears: (qweight, qzeros, scales, g_idx) per Linear, biases: one per Linear (or
//                    None), zero_offset) -> [M,N_i] per Linear, in x's dtype
//       Several Linears on the same x in one call (an attention layer's q, k, v): x is converted once, and a decode
//       row on the VNNI path walks all the weights in one parallel region, each thread one contiguous slice of their
//       column blocks taken together (one region per Linear costs each its own start; docs/benchmarks.md).
//   Every tensor is checked here (CPU, dtype, shape, g_idx's range); any strides are accepted.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "decode_ops.h"
#include "int4_gemm.h"

namespace qmoe {

namespace {

// The weight from t[0..3], kept in `cache` at `slot` (a DecodeLayerPack's) or prepared for this call.
std::shared_ptr<const Int4Weight> int4_weight(const at::Tensor* t, int64_t zero_offset, const std::string& what,
                                              Int4WeightCache* cache, size_t slot) {
  return kept_or_prepared(cache, slot, t,
                          [&](Int4Weight& w) { w.prepare(t[0], t[1], t[2], t[3], zero_offset, what); });
}

// The epilogue (bias, rounding to x's dtype) is a plain loop rather than ATen's add_() and to(), as x's conversion
// is (read_floats): in a decode step these run with caches cold (each layer's MoE block streams ~36 MB of weights
// through them), where each ATen call costs ~15-35 us before its first element (docs/benchmarks.md). Same
// arithmetic: one fp32 add, then one round-to-nearest-even to x's dtype.

// Rows per parallel task of the epilogue: one task (no parallel region) for a decode step's rows.
int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols)); }

// x [M, K] (checked: float, bf16 or fp16, any strides) as contiguous fp32 rows.
at::Tensor float_rows(const at::Tensor& x, const char* op) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  read_floats(x, out.data_ptr<float>(), op, "x");
  return out;
}

// y [M, N] (the kernel's fp32 sums, contiguous) + bias [N] (if defined; float, bf16 or fp16, any stride), rounded
// once to dtype: what y.add_(bias.to(float)).to(dtype) gives, bit for bit.
at::Tensor finish(at::Tensor y, const at::Tensor& bias, at::ScalarType dtype) {
  if (!bias.defined() && dtype == at::kFloat) return y;
  const int64_t M = y.size(0), N = y.size(1);
  at::Tensor out = dtype == at::kFloat ? y : at::empty({M, N}, y.options().dtype(dtype));
  const float* yp = y.data_ptr<float>();
  with_floating(dtype, [&](auto out_tag) {
    using O = decltype(out_tag);
    O* op = out.data_ptr<O>();
    if (!bias.defined()) {  // no add: y + 0 would turn -0.0 into +0.0
      at::parallel_for(0, M, rows_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin * N; i < end * N; ++i) op[i] = static_cast<O>(yp[i]);
      });
      return;
    }
    with_floating(bias.scalar_type(), [&](auto bias_tag) {
      using B = decltype(bias_tag);
      const B* bp = bias.data_ptr<B>();
      const int64_t bs = bias.stride(0);
      at::parallel_for(0, M, rows_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          for (int64_t j = 0; j < N; ++j)
            op[i * N + j] = static_cast<O>(yp[i * N + j] + static_cast<float>(bp[j * bs]));
      });
    });
  });
  return out;
}

}  // namespace

at::Tensor gptq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, int64_t zero_offset,
                           const c10::optional<at::Tensor>& bias) {
  const at::Tensor t[4] = {qweight, qzeros, scales, g_idx};
  return gptq_linear_kept(x, t, zero_offset, bias, nullptr, 0);
}

at::Tensor gptq_linear_kept(const at::Tensor& x, const at::Tensor* t, int64_t zero_offset,
                            const c10::optional<at::Tensor>& bias, Int4WeightCache* cache, size_t slot) {
  const char* op = "gptq_linear_cpu";
  const at::Device cpu(at::kCPU);
  // checks the four GPTQ tensors and keeps (contiguous copies of) them for the call
  const std::shared_ptr<const Int4Weight> kept = int4_weight(t, zero_offset, op, cache, slot);
  const Int4Weight& w = *kept;
  const at::Tensor xf =
      float_rows(qmoe::TensorArg(x, op, "x", cpu).floating().sizes({-1, w.K}, "qweight").tensor(), op);
  const int64_t M = x.size(0), N = w.N;
  at::Tensor b;
  if (bias.has_value() && bias->defined())
    b = qmoe::TensorArg(*bias, op, "bias", cpu).floating().sizes({N}, "qweight").tensor();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  qmoe::int4_matmul(w, xf.data_ptr<float>(), M, out.data_ptr<float>(), N,  // K = 0 gives zeros
                    qmoe::int4_act(x.scalar_type()));
  return finish(out, b, x.scalar_type());
}

std::vector<at::Tensor> gptq_linears_cpu(const at::Tensor& x, at::TensorList linears,
                                         const c10::List<c10::optional<at::Tensor>>& biases, int64_t zero_offset) {
  return gptq_linears_kept(x, linears, biases, zero_offset, nullptr);
}

std::vector<at::Tensor> gptq_linears_kept(const at::Tensor& x, at::TensorList linears,
                                          const c10::List<c10::optional<at::Tensor>>& biases, int64_t zero_offset,
                                          Int4WeightCache* cache) {
  const char* op = "gptq_linears_cpu";
  const at::Device cpu(at::kCPU);
  TORCH_CHECK(!linears.empty() && linears.size() % 4 == 0, op, ": linears must hold qweight, qzeros, scales and "
              "g_idx of each Linear (a non-empty multiple of 4 tensors), got ", linears.size());
  const int64_t L = static_cast<int64_t>(linears.size()) / 4;
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L, op, ": biases must hold one entry (a tensor or None) per "
              "Linear: ", L, " for ", linears.size(), " tensors, got ", biases.size());
  std::vector<std::shared_ptr<const Int4Weight>> kept(L);
  std::vector<const Int4Weight*> wp(L);
  for (int64_t i = 0; i < L; ++i) {
    kept[i] = int4_weight(linears.data() + 4 * i, zero_offset, std::string(op) + ": linear " + std::to_string(i),
                          cache, static_cast<size_t>(i));
    wp[i] = kept[i].get();
  }
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(wp[i]->K == wp[0]->K, op, ": linear ", i, " has ", wp[i]->K, " inputs, linear 0 has ", wp[0]->K,
                " (every Linear reads the same x)");
  }
  const at::Tensor xf = float_rows(
      qmoe::TensorArg(x, op, "x", cpu).floating().sizes({-1, wp[0]->K}, "linears[0] (qweight)").tensor(), op);
  std::vector<at::Tensor> bias(L);
  for (int64_t i = 0; i < L; ++i) {
    const c10::optional<at::Tensor> b = biases.get(i);
    if (b.has_value() && b->defined()) {
      bias[i] = qmoe::TensorArg(*b, op, "biases[" + std::to_string(i) + "]", cpu).floating()
                    .sizes({wp[i]->N}, "its qweight").tensor();
    }
  }
  const int64_t M = x.size(0), K = wp[0]->K;
  const qmoe::Int4Act act = qmoe::int4_act(x.scalar_type());
  std::vector<at::Tensor> out(L);
  for (int64_t i = 0; i < L; ++i) out[i] = at::empty({M, wp[i]->N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  bool one_region = M == 1;
  for (int64_t i = 0; i < L && one_region; ++i) one_region = qmoe::int4_row_in_region(*wp[i], act);
  if (one_region) {
    std::vector<qmoe::Int4RowJob> jobs;
    for (int64_t i = 0; i < L; ++i) jobs.push_back({wp[i], xp, out[i].data_ptr<float>()});
    qmoe::int4_rows_one_region(jobs);
  } else {
    for (int64_t i = 0; i < L; ++i) qmoe::int4_matmul(*wp[i], xp, M, out[i].data_ptr<float>(), wp[i]->N, act);
  }
  for (int64_t i = 0; i < L; ++i) out[i] = finish(out[i], bias[i], x.scalar_type());
  return out;
}

}  // namespace qmoe

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) {
  m.impl("gptq_linear_cpu", &qmoe::gptq_linear_cpu);
  m.impl("gptq_linears_cpu", &qmoe::gptq_linears_cpu);
}
