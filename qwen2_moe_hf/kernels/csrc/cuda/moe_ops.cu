// CUDA implementations of the expert-dispatch ops. Schemas: qwen2_moe_hf/kernels/ops.py; contracts and the CPU twins
// every result is tested against: csrc/cpu/moe_ops_cpu.cpp. No host synchronisation anywhere, so the ops can be
// captured in CUDA graphs: moe_align returns fixed upper-bound sizes (see the CPU twin).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>

#include "../common/checks.h"

namespace {

using qmoe::TensorArg;

constexpr int kWarp = 32;

// The device of an op's first tensor, which must be a CUDA one; every other tensor is checked against it.
at::Device cuda_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ",
              t.defined() ? t.device().str() : std::string("an undefined tensor"));
  return t.device();
}

template <typename T>
__device__ __forceinline__ float as_float(T v) { return static_cast<float>(v); }

// The rank order of qwen2_moe_hf.moe.routing.route (csrc/cpu/routing.h): larger fp32 logit first (the exact
// probabilities' order); equal ones, the lower expert id first; a NaN probability before every number (key +inf).
__device__ __forceinline__ float rank_key(float logit, float probability) {
  return isnan(probability) ? INFINITY : logit;
}

__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  if (a != b) return a > b;
  return ia < ib;
}

__device__ __forceinline__ float nan_max(float a, float b) { return (isnan(a) || isnan(b)) ? NAN : fmaxf(a, b); }

// One warp per token. Experts are spread over the lanes (E=60: two per lane), so any E works, powers of two or not.
// Selection repeats a warp arg-max k times in ranks_before's order, as on CPU.
template <typename T>
__global__ void topk_softmax_kernel(const T* __restrict__ logits, float* __restrict__ weights,
                                    int64_t* __restrict__ ids, int64_t tokens, int E, int k, bool renormalize) {
  extern __shared__ float smem[];
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (t >= tokens) return;
  float* p = smem + warp * E;
  const T* row = logits + t * E;
  float mx = -INFINITY;  // NaN spreads, as in torch's softmax: a row with a NaN logit is all NaN
  for (int i = lane; i < E; i += kWarp) mx = nan_max(mx, as_float(row[i]));
  for (int o = kWarp / 2; o > 0; o /= 2) mx = nan_max(mx, __shfl_xor_sync(0xffffffff, mx, o));
  float sum = 0.f;
  for (int i = lane; i < E; i += kWarp) sum += (p[i] = __expf(as_float(row[i]) - mx));
  for (int o = kWarp / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
  __syncwarp();
  float picked = 0.f;
  for (int j = 0; j < k; ++j) {
    float best = 0.f;  // the best rank key so far (valid when best_i < E)
    int best_i = E;
    for (int i = lane; i < E; i += kWarp) {
      if (p[i] == -1.f) continue;  // taken (probabilities are >= 0 or NaN)
      const float key = rank_key(as_float(row[i]), p[i]);
      if (best_i == E || ranks_before(key, i, best, best_i)) { best = key; best_i = i; }
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffff, best, o);
      const int oi = __shfl_xor_sync(0xffffffff, best_i, o);
      if (oi < E && (best_i == E || ranks_before(ob, oi, best, best_i))) { best = ob; best_i = oi; }
    }
    const float prob = p[best_i] / sum;  // every lane holds the same best_i (k <= E, so one is left)
    if (lane == 0) {
      weights[t * k + j] = prob;
      ids[t * k + j] = best_i;
    }
    picked += prob;
    __syncwarp();
    if (lane == best_i % kWarp) p[best_i] = -1.f;  // taken
    __syncwarp();
  }
  if (renormalize && lane == 0)
    for (int j = 0; j < k; ++j) weights[t * k + j] /= picked;
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& logits, int64_t k, bool renormalize) {
  const char* op = "topk_softmax";
  const at::Device device = cuda_device(logits, op, "logits");
  const at::Tensor l = TensorArg(logits, op, "logits", device).floating().dim(2).contiguous();
  const int64_t T = l.size(0);
  qmoe::check_range(l.size(1), 1, qmoe::kMaxExperts, op, "experts (logits.size(1))");  // shared memory: 4 x E floats
  const int E = static_cast<int>(l.size(1));
  qmoe::check_range(k, 1, E, op, "k");
  qmoe::check_range(qmoe::checked_mul(T, k, op, "tokens * k"), 0, INT32_MAX, op, "tokens * k");
  const at::cuda::CUDAGuard guard(device);
  at::Tensor weights = at::empty({T, k}, l.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, k}, l.options().dtype(at::kLong));
  if (T == 0) return {weights, ids};
  const int warps = 4;
  const dim3 grid((T + warps - 1) / warps);
  const size_t smem = static_cast<size_t>(warps) * E * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "topk_softmax", [&] {
    topk_softmax_kernel<scalar_t><<<grid, warps * kWarp, smem, stream>>>(
        l.data_ptr<scalar_t>(), weights.data_ptr<float>(), ids.data_ptr<int64_t>(), T, E, static_cast<int>(k),
        renormalize);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids};
}

// moe_align in one block: each thread owns a contiguous chunk of slots; per-(expert, thread) counts, an exclusive
// scan in (expert, thread) order, then each thread writes its chunk in order -> stable, deterministic grouping.
__global__ void align_kernel(const int64_t* __restrict__ ids, int64_t slots, int E, int block,
                             int32_t* __restrict__ counts /* [E, threads] */, int32_t* __restrict__ sorted,
                             int32_t* __restrict__ block_experts, int64_t max_blocks, int32_t* __restrict__ offsets) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t chunk = (slots + nt - 1) / nt;
  const int64_t s0 = tid * chunk, s1 = min(slots, s0 + chunk);
  for (int e = 0; e < E; ++e) counts[e * nt + tid] = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t e = ids[s];
    if (e >= 0 && e < E) counts[e * nt + tid]++;  // out-of-range ids are left out (no sync to report them)
  }
  __syncthreads();
  if (tid == 0) {
    int32_t pos = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = pos;
      int32_t n = 0;
      for (int t = 0; t < nt; ++t) {
        const int32_t c = counts[e * nt + t];
        counts[e * nt + t] = pos + n;  // this thread's first position for expert e
        n += c;
      }
      pos += (n + block - 1) / block * block;
    }
    offsets[E] = pos;
  }
  __syncthreads();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t e = ids[s];
    if (e < 0 || e >= E) continue;
    sorted[counts[e * nt + tid]++] = static_cast<int32_t>(s);
  }
  for (int e = 0; e < E; ++e)
    for (int64_t b = offsets[e] / block + tid; b < offsets[e + 1] / block; b += nt) block_experts[b] = e;
  for (int64_t b = offsets[E] / block + tid; b < max_blocks; b += nt) block_experts[b] = -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& ids, int64_t num_experts,
                                                              int64_t block) {
  const char* op = "moe_align";
  const at::Device device = cuda_device(ids, op, "ids");
  const at::Tensor c = TensorArg(ids, op, "ids", device).dtype(at::kLong).dim(2).contiguous();
  qmoe::check_range(num_experts, 1, qmoe::kMaxExperts, op, "num_experts");
  qmoe::check_range(block, 1, qmoe::kMaxAlignBlock, op, "block");
  const int64_t slots = c.numel();
  // Slot numbers, offsets and the sentinel are int32.
  qmoe::check_range(slots + num_experts * (block - 1), 0, INT32_MAX, op, "tokens * k + num_experts * (block - 1)");
  const at::cuda::CUDAGuard guard(device);
  const int64_t max_padded = slots + num_experts * (block - 1);
  const int64_t max_blocks = (max_padded + block - 1) / block;
  auto i32 = c.options().dtype(at::kInt);
  const int threads = 256;
  at::Tensor counts = at::empty({num_experts * threads}, i32);
  at::Tensor sorted = at::full({max_blocks * block}, static_cast<int32_t>(slots), i32);
  at::Tensor block_experts = at::empty({max_blocks}, i32);
  at::Tensor offsets = at::empty({num_experts + 1}, i32);
  align_kernel<<<1, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), slots, static_cast<int>(num_experts), static_cast<int>(block),
      counts.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(), block_experts.data_ptr<int32_t>(), max_blocks,
      offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted, block_experts, offsets};
}

template <typename T>
__global__ void combine_kernel(const T* __restrict__ expert_out, const float* __restrict__ weights,
                               const T* __restrict__ shared_out, const float* __restrict__ shared_gate,
                               T* __restrict__ out, int k, int64_t H) {
  const int64_t t = blockIdx.x;
  const float s = shared_out ? 1.f / (1.f + __expf(-shared_gate[t])) : 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) acc += weights[t * k + j] * as_float(expert_out[(t * k + j) * H + h]);
    if (shared_out) acc += s * as_float(shared_out[t * H + h]);
    out[t * H + h] = static_cast<T>(acc);
  }
}

at::Tensor moe_combine_cuda(const at::Tensor& expert_out, const at::Tensor& weights,
                            const c10::optional<at::Tensor>& shared_out,
                            const c10::optional<at::Tensor>& shared_gate) {
  const char* op = "moe_combine";
  const at::Device device = cuda_device(expert_out, op, "expert_out");
  TensorArg(weights, op, "weights", device).floating().dim(2);
  const int64_t T = weights.size(0), k = weights.size(1);
  TORCH_CHECK(k <= INT32_MAX, op, ": k=", k, " does not fit in int32");
  const int64_t slots = qmoe::checked_mul(T, k, op, "tokens * k");
  TensorArg(expert_out, op, "expert_out", device).floating().sizes({slots, -1}, "weights (tokens * k rows)");
  const int64_t H = expert_out.size(1);
  const at::cuda::CUDAGuard guard(device);
  at::Tensor y = expert_out.contiguous();
  at::Tensor w = weights.to(at::kFloat).contiguous();
  const bool has_shared = shared_out.has_value() && shared_out->defined();
  const bool has_gate = shared_gate.has_value() && shared_gate->defined();
  TORCH_CHECK(has_shared == has_gate, op, ": shared_out and shared_gate come together (got ",
              has_shared ? "shared_out" : "shared_gate", " alone)");
  at::Tensor so, sg;
  if (has_shared) {
    TensorArg(*shared_out, op, "shared_out", device).floating().sizes({T, H}, "weights and expert_out");
    TensorArg(*shared_gate, op, "shared_gate", device).floating().numel(T, "weights (one per token)");
    so = shared_out->to(y.scalar_type()).contiguous();
    sg = shared_gate->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({T, H}, y.options());
  if (T == 0 || H == 0) return out;
  TORCH_CHECK(T <= INT32_MAX, op, ": ", T, " tokens exceed the grid's 2^31 - 1 blocks");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine", [&] {
    combine_kernel<scalar_t><<<T, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), w.data_ptr<float>(), has_shared ? so.data_ptr<scalar_t>() : nullptr,
        has_shared ? sg.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), static_cast<int>(k), H);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen2_moe_hf, CUDA, m) {
  m.impl("topk_softmax", &topk_softmax_cuda);
  m.impl("moe_align", &moe_align_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
}
