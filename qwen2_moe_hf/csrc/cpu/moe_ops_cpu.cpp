// CPU twins of the CUDA expert-dispatch ops (csrc/cuda/moe_ops.cu): same schemas, same results, so every contract
// is tested here without a GPU. The schemas are defined once, in Python (qwen2_moe_hf/moe/ops.py), for both.
//
//   topk_softmax(logits [T,E], k, renormalize) -> (weights [T,k] fp32, ids [T,k] int64)
//       softmax over E in fp32, the k largest in descending order; equal probabilities go to the lower expert id.
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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits, int64_t k, bool renormalize) {
  TORCH_CHECK(logits.dim() == 2, "topk_softmax: logits must be [tokens, experts], got ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "topk_softmax: k=", k, " must be in [1, experts=", E, "]");
  at::Tensor l = logits.to(at::kFloat).contiguous();
  at::Tensor weights = at::empty({T, k}, l.options());
  at::Tensor ids = at::empty({T, k}, l.options().dtype(at::kLong));
  const float* lp = l.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    std::vector<float> p(E);
    std::vector<char> taken(E);
    for (int64_t t = b; t < e; ++t) {
      const float* row = lp + t * E;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < E; ++i) mx = std::max(mx, row[i]);
      float sum = 0.f;
      for (int64_t i = 0; i < E; ++i) sum += (p[i] = std::exp(row[i] - mx));
      std::fill(taken.begin(), taken.end(), 0);
      float picked = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t i = 0; i < E; ++i)  // strict '>' keeps the lowest id among equals; NaN never wins
          if (!taken[i] && (best < 0 || p[i] > p[best])) best = i;
        taken[best] = 1;
        ip[t * k + j] = best;
        picked += (wp[t * k + j] = p[best] / sum);
      }
      if (renormalize && picked > 0.f)
        for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= picked;
    }
  });
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& ids, int64_t num_experts,
                                                             int64_t block) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "moe_align: ids must be int64 [tokens, k]");
  TORCH_CHECK(num_experts >= 1 && block >= 1, "moe_align: num_experts and block must be >= 1");
  at::Tensor c = ids.contiguous();
  const int64_t slots = c.numel();
  const int64_t* ip = c.data_ptr<int64_t>();
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(ip[s] >= 0 && ip[s] < num_experts, "moe_align: expert id ", ip[s], " out of range [0, ",
                num_experts, ")");
    counts[ip[s]]++;
  }
  auto i32 = c.options().dtype(at::kInt);
  at::Tensor offsets = at::empty({num_experts + 1}, i32);
  int32_t* op = offsets.data_ptr<int32_t>();
  op[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) op[e + 1] = op[e] + (counts[e] + block - 1) / block * block;
  const int64_t max_blocks = (slots + num_experts * (block - 1) + block - 1) / block;
  at::Tensor sorted = at::full({max_blocks * block}, static_cast<int32_t>(slots), i32);
  at::Tensor block_experts = at::full({max_blocks}, -1, i32);
  int32_t* sp = sorted.data_ptr<int32_t>();
  int32_t* bp = block_experts.data_ptr<int32_t>();
  std::vector<int64_t> cursor(op, op + num_experts);
  for (int64_t s = 0; s < slots; ++s) sp[cursor[ip[s]]++] = static_cast<int32_t>(s);
  for (int64_t e = 0; e < num_experts; ++e)
    for (int64_t b = op[e] / block; b < op[e + 1] / block; ++b) bp[b] = static_cast<int32_t>(e);
  return {sorted, block_experts, offsets};
}

at::Tensor moe_combine_cpu(const at::Tensor& expert_out, const at::Tensor& weights,
                           const c10::optional<at::Tensor>& shared_out, const c10::optional<at::Tensor>& shared_gate) {
  TORCH_CHECK(weights.dim() == 2, "moe_combine: weights must be [tokens, k]");
  const int64_t T = weights.size(0), k = weights.size(1);
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(0) == T * k,
              "moe_combine: expert_out must be [tokens*k=", T * k, ", hidden], got ", expert_out.sizes());
  const int64_t H = expert_out.size(1);
  at::Tensor y = expert_out.to(at::kFloat).contiguous();
  at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor so, sg;
  const bool has_shared = shared_out.has_value() && shared_out->defined();
  if (has_shared) {
    TORCH_CHECK(shared_gate.has_value() && shared_gate->numel() == T, "moe_combine: shared_gate must be [tokens, 1]");
    TORCH_CHECK(shared_out->sizes() == at::IntArrayRef({T, H}), "moe_combine: shared_out must be [tokens, hidden]");
    so = shared_out->to(at::kFloat).contiguous();
    sg = shared_gate->to(at::kFloat).contiguous();
  }
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
