// gptq_linear_cpu: y = x @ W^T (+ bias) for one GPTQ 4-bit Linear on CPU (the kernel is int4_gemm.h).
//
// Why not torch's _weight_int4pack_mm_for_cpu: its packed layout depends on the CPU's vector width (it cannot be
// saved or read back portably), and on this AVX2 machine it ran slower than bf16 at one row.
//
// Contract (schema in qwen2_moe_hf/kernels/ops.py):
//   gptq_linear_cpu(x [M,K] float/bf16/fp16, qweight [K/8,N] int32 (or blocked [N/64,K/8,64]: int4_gemm.h),
//                   qzeros [G,N/8] int32, scales [G,N] float, g_idx [K] int32 in [0, G), zero_offset 0 or 1,
//                   bias [N] float?) -> [M,N] in x's dtype
//   Every tensor is checked here (CPU, dtype, shape, g_idx's range); any strides are accepted.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "int4_gemm.h"

namespace {

at::Tensor gptq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, int64_t zero_offset,
                           const c10::optional<at::Tensor>& bias) {
  const char* op = "gptq_linear_cpu";
  const at::Device cpu(at::kCPU);
  qmoe::Int4Weight w;  // checks the four GPTQ tensors and keeps (contiguous copies of) them for the call
  w.prepare(qweight, qzeros, scales, g_idx, zero_offset, op);
  const at::Tensor xf = qmoe::TensorArg(x, op, "x", cpu).floating().sizes({-1, w.K}, "qweight").tensor().to(at::kFloat)
                            .contiguous();
  const int64_t M = x.size(0), N = w.N;
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  qmoe::int4_matmul(w, xf.data_ptr<float>(), M, out.data_ptr<float>(), N,  // K = 0 gives zeros
                    /*bf16=*/x.scalar_type() == at::kBFloat16);
  if (bias.has_value() && bias->defined()) {
    qmoe::TensorArg(*bias, op, "bias", cpu).floating().sizes({N}, "qweight");
    out.add_(bias->to(at::kFloat));
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) { m.impl("gptq_linear_cpu", &gptq_linear_cpu); }
