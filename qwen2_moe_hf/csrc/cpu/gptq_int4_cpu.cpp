// gptq_linear_cpu: y = x @ W^T (+ bias) for one GPTQ 4-bit Linear on CPU (the kernel is int4_gemm.h).
//
// Why not torch's _weight_int4pack_mm_for_cpu: its packed layout depends on the CPU's vector width (it cannot be
// saved or read back portably), and on this AVX2 machine it ran slower than bf16 at one row.
//
// Contract (schema in qwen2_moe_hf/gptq/ops.py):
//   gptq_linear_cpu(x [M,K] float/bf16/fp16, qweight [K/8,N] int32, qzeros [G,N/8] int32, scales [G,N] float,
//                   g_idx [K] int32, zero_offset, bias [N]?) -> [M,N] in x's dtype

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "int4_gemm.h"

namespace {

at::Tensor gptq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, int64_t zero_offset,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "gptq_linear_cpu: x must be a [M, K] CPU tensor, got ", x.sizes());
  qmoe::Int4Weight w;
  w.prepare(qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(), zero_offset,
            "gptq_linear_cpu");
  TORCH_CHECK(x.size(1) == w.K, "gptq_linear_cpu: x has K=", x.size(1), ", qweight holds K=", w.K);
  const int64_t M = x.size(0), N = w.N;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  qmoe::int4_matmul(w, xf.data_ptr<float>(), M, out.data_ptr<float>(), N);  // K = 0 gives zeros
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) { m.impl("gptq_linear_cpu", &gptq_linear_cpu); }
