// CPU twins of the CUDA expert-dispatch ops (csrc/cuda/moe_ops.cu): same schemas, same results, so every contract
// is tested here without a GPU. The schemas are defined once, in Python (qwen2_moe_hf/kernels/ops.py), for both.
//
//   topk_softmax(logits [T,E], k, renormalize) -> (weights [T,k] fp32, ids [T,k] int64)
//       the router's top-k as qwen2_moe_hf.moe.routing.route defines it (routing.h): softmax over E in fp32, the k
//       highest ranked (equal probabilities: the lower expert id first; NaN first), weights in fp32.
//   moe_align(ids [T,k] int64, num_experts, block) -> (sorted_slots [B*block] int32, block_experts [B] int32,
//                                                      expert_offsets [E+1] int32)
//       the T*k slots (t*k + j) grouped by expert, ascending slot order within an expert, each expert's group padded
//       to a multiple of `block` with the sentinel T*k; expert_offsets are the padded group starts (the last one is
//       the used length); block_experts[b] is the expert of the b-th block. Sizes are the fixed upper bound
//       B = ceil((T*k + E*(block-1)) / block), so no host sync is needed on GPU: unused blocks have expert -1 and
//       only sentinels. Ids outside [0, E) raise here; the CUDA version leaves them out.
//   moe_combine(expert_out [T*k,H], weights [T,k], shared_out [T,H]?, shared_gate [T,1]?) -> [T,H]
//       out[t] = sum_j weights[t,j] * expert_out[t*k+j] (+ sigmoid(shared_gate[t]) * shared_out[t]), accumulated in
//       fp32 in slot order, returned in expert_out's dtype.
// Every tensor is checked at the boundary (common/checks.h): CPU, dtype, shape; any strides are accepted. Limits
// shared with the CUDA twins: at most 3072 experts, block <= 65536, T*k + E*(block-1) < 2^31 (int32 slots).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "routing.h"

namespace {

using qmoe::TensorArg;

const at::Device kCpu(at::kCPU);

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits, int64_t k, bool renormalize) {
  const char* op = "topk_softmax";
  const at::Tensor l = TensorArg(logits, op, "logits", kCpu).floating().dim(2).contiguous();
  const int64_t T = l.size(0), E = l.size(1);
  qmoe::check_range(E, 1, qmoe::kMaxExperts, op, "experts (logits.size(1))");
  qmoe::check_range(k, 1, E, op, "k");
  qmoe::check_range(qmoe::checked_mul(T, k, op, "tokens * k"), 0, INT32_MAX, op, "tokens * k");
  const at::Tensor lf = l.to(at::kFloat);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor weights = at::empty({T, k}, f32);
  at::Tensor ids = at::empty({T, k}, f32.dtype(at::kLong));
  const float* lp = lf.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    std::vector<float> p(E);
    std::vector<char> taken(E);
    for (int64_t t = b; t < e; ++t) qmoe::route_row(lp + t * E, E, k, renormalize, ip + t * k, wp + t * k, p, taken);
  });
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& ids, int64_t num_experts,
                                                             int64_t block) {
  const char* op = "moe_align";
  const at::Tensor c = TensorArg(ids, op, "ids", kCpu).dtype(at::kLong).dim(2).contiguous();
  qmoe::check_range(num_experts, 1, qmoe::kMaxExperts, op, "num_experts");
  qmoe::check_range(block, 1, qmoe::kMaxAlignBlock, op, "block");
  const int64_t slots = c.numel();
  // The padded length bounds every slot number, offset and the sentinel, all stored as int32.
  qmoe::check_range(slots + num_experts * (block - 1), 0, INT32_MAX, op, "tokens * k + num_experts * (block - 1)");
  const int64_t* ip = c.data_ptr<int64_t>();
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(ip[s] >= 0 && ip[s] < num_experts, op, ": expert id ", ip[s], " out of range [0, ", num_experts,
                ")");
    counts[ip[s]]++;
  }
  auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor offsets = at::empty({num_experts + 1}, i32);
  int32_t* op32 = offsets.data_ptr<int32_t>();
  op32[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e)
    op32[e + 1] = static_cast<int32_t>(op32[e] + (counts[e] + block - 1) / block * block);
  const int64_t max_blocks = (slots + num_experts * (block - 1) + block - 1) / block;
  at::Tensor sorted = at::full({max_blocks * block}, static_cast<int32_t>(slots), i32);
  at::Tensor block_experts = at::full({max_blocks}, -1, i32);
  int32_t* sp = sorted.data_ptr<int32_t>();
  int32_t* bp = block_experts.data_ptr<int32_t>();
  std::vector<int64_t> cursor(op32, op32 + num_experts);
  for (int64_t s = 0; s < slots; ++s) sp[cursor[ip[s]]++] = static_cast<int32_t>(s);
  for (int64_t e = 0; e < num_experts; ++e)
    for (int64_t b = op32[e] / block; b < op32[e + 1] / block; ++b) bp[b] = static_cast<int32_t>(e);
  return {sorted, block_experts, offsets};
}

at::Tensor moe_combine_cpu(const at::Tensor& expert_out, const at::Tensor& weights,
                           const c10::optional<at::Tensor>& shared_out, const c10::optional<at::Tensor>& shared_gate) {
  const char* op = "moe_combine";
  TensorArg(weights, op, "weights", kCpu).floating().dim(2);
  const int64_t T = weights.size(0), k = weights.size(1);
  const int64_t slots = qmoe::checked_mul(T, k, op, "tokens * k");
  TensorArg(expert_out, op, "expert_out", kCpu).floating().sizes({slots, -1}, "weights (tokens * k rows)");
  const int64_t H = expert_out.size(1);
  const bool has_shared = shared_out.has_value() && shared_out->defined();
  const bool has_gate = shared_gate.has_value() && shared_gate->defined();
  TORCH_CHECK(has_shared == has_gate, op, ": shared_out and shared_gate come together (got ",
              has_shared ? "shared_out" : "shared_gate", " alone)");
  at::Tensor so, sg;
  if (has_shared) {
    TensorArg(*shared_out, op, "shared_out", kCpu).floating().sizes({T, H}, "weights and expert_out");
    TensorArg(*shared_gate, op, "shared_gate", kCpu).floating().numel(T, "weights (one per token)");
    so = shared_out->to(at::kFloat).contiguous();
    sg = shared_gate->to(at::kFloat).contiguous();
  }
  at::Tensor y = expert_out.to(at::kFloat).contiguous();
  at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T, H}, y.options());
  const float *yp = y.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* sop = has_shared ? so.data_ptr<float>() : nullptr;
  const float* sgp = has_shared ? sg.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* o = outp + t * H;
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float wj = wp[t * k + j];
        const float* yr = yp + (t * k + j) * H;
        for (int64_t h = 0; h < H; ++h) o[h] += wj * yr[h];
      }
      if (sop) {
        const float s = 1.f / (1.f + std::exp(-sgp[t]));
        for (int64_t h = 0; h < H; ++h) o[h] += s * sop[t * H + h];
      }
    }
  });
  return out.to(expert_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CPU, m) {
  m.impl("topk_softmax", &topk_softmax_cpu);
  m.impl("moe_align", &moe_align_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
}
