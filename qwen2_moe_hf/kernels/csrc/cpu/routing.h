// The router's top-k on CPU, as qwen2_moe_hf.moe.routing.route defines it (the one definition every backend and
// kernel follows): softmax over the experts in fp32; experts ranked by fp32 logit, largest first (the exact
// probabilities' order, which no rounding of exp can change); equal logits rank the lower expert id first; a NaN
// probability ranks above every number (a row with a NaN logit is all NaN after the softmax, so its ids are
// 0..k-1); optionally renormalised over the k picked.
// Used by topk_softmax (moe_ops_cpu.cpp) and by the fused layer's routing (moe_ffn_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace qmoe {

// The rank key of an expert: its logit, or +inf where its probability is NaN (NaN ranks first).
inline float rank_key(float logit, float probability) {
  return std::isnan(probability) ? std::numeric_limits<float>::infinity() : logit;
}

// Whether key a (of expert ia) ranks before key b (of expert ib). Keys are never NaN.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  if (a != b) return a > b;
  return ia < ib;
}

// One token's routing: logits[0:E] (fp32) -> ids[0:k], weights[0:k] (fp32). `p` and `taken` are scratch of E.
inline void route_row(const float* logits, int64_t E, int64_t k, bool renormalize, int64_t* ids, float* weights,
                      std::vector<float>& p, std::vector<char>& taken) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < E; ++i) {
    const float v = logits[i];
    if (std::isnan(v) || std::isnan(mx)) mx = std::numeric_limits<float>::quiet_NaN();  // NaN spreads, as in torch
    else mx = std::max(mx, v);
  }
  float sum = 0.f;
  for (int64_t i = 0; i < E; ++i) sum += (p[i] = std::exp(logits[i] - mx));
  std::fill(taken.begin(), taken.begin() + E, 0);
  float picked = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < E; ++i)
      if (!taken[i] && (best < 0 || ranks_before(rank_key(logits[i], p[i]), i,
                                                 rank_key(logits[best], p[best]), best)))
        best = i;
    taken[best] = 1;
    ids[j] = best;
    picked += (weights[j] = p[best] / sum);
  }
  if (renormalize)
    for (int64_t j = 0; j < k; ++j) weights[j] /= picked;
}

}  // namespace qmoe
