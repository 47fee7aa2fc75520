// When the CPU ops hand a GEMM to oneDNN's bf16 matmul (at::mm) instead of their own AVX2 kernels: on CPUs with
// native bf16 arithmetic (AMX tiles, AVX-512 BF16), whose matmuls the fp32-FMA kernels cannot match once an expert
// has a few rows. Picked once per process from the CPU, settable (tests run every path on every machine, oneDNN's
// bf16 matmul being correct, if emulated and slow, without native bf16). Numbers: docs/dispatch.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>

#include <atomic>
#include <cstdint>

#include "bf16_dot.h"

namespace qmoe {

enum class NativeKind { kBf16Weights = 0, kInt4Weights = 1 };

inline int64_t native_rows_default(NativeKind kind) {
  const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [&](const char* key) {
    auto it = caps.find(key);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  const bool int4 = kind == NativeKind::kInt4Weights;
  // AMX-BF16, measured on the 2-vCPU AMX Xeon (whole real-shape block, interleaved medians):
  //   bf16 jobs from 4 rows: 16 tokens 41.4 -> 38.4 ms, 64 tokens 110 -> 71, 256 tokens 350 -> 112;
  //   int4 jobs (dequantized to bf16 per job, then at::mm) from 128 rows: at 256 tokens 242 -> ~205 ms (the shared
  //   expert's 256 rows gain; the routed experts' ~17 rows lose: dequantizing costs more than the matmul saves),
  //   at 64 tokens a 64-row threshold made it 67 -> 92 ms.
  if (has("amx_bf16") && at::cpu::init_amx()) return int4 ? 128 : 4;
  // AVX-512 BF16 without AMX: with the vdpbf16ps kernel compiled (bf16_dot.h), oneDNN only from 128 rows (Zen 4,
  // whole real-shape block, interleaved medians: 1024 tokens, ~68 rows per expert: 383 ms with oneDNN from 64 rows,
  // 365 from 128; the shared expert's 256+ rows stay on oneDNN, ~410 GFLOP/s). Without it, from 16 rows
  // (transformers' oneDNN path beat our fp32-FMA kernels 1.4x at ~17 rows per expert on such a Xeon). The int4
  // path is not enabled there (unmeasured).
  if (has("avx512_bf16")) return int4 ? 0 : kHaveBf16Dot ? 128 : 16;
  return 0;  // AVX2 only: oneDNN's bf16 is emulated (~20 GFLOP/s)
}

inline std::atomic<int64_t>& native_rows_slot(NativeKind kind) {
  static std::atomic<int64_t> slots[2] = {{-1}, {-1}};
  return slots[static_cast<int>(kind)];
}

// Rows of x per job from which the job goes to oneDNN (0: never).
inline int64_t native_rows(NativeKind kind) {
  std::atomic<int64_t>& slot = native_rows_slot(kind);
  int64_t rows = slot.load(std::memory_order_relaxed);
  if (rows < 0) {
    rows = native_rows_default(kind);
    slot.store(rows, std::memory_order_relaxed);
  }
  return rows;
}

// rows >= 0 sets it, -1 restores the CPU's default.
inline void set_native_rows(NativeKind kind, int64_t rows) {
  TORCH_CHECK(rows >= -1, "set_native_rows: rows must be >= 0 (or -1: this CPU's default), got ", rows);
  native_rows_slot(kind).store(rows == -1 ? native_rows_default(kind) : rows);
}

// y [M, N] (fp32, row stride ldy) = x [M, K] (fp32, contiguous) @ wt where wt is W^T [K, N] or, with transposed,
// W [N, K]; both bf16. x is rounded to bf16 as the torch path rounds its activations.
inline void native_bf16_mm(const float* x, int64_t M, int64_t K, const at::Tensor& w_bf16, bool transposed,
                           float* y, int64_t N, int64_t ldy) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xm = at::from_blob(const_cast<float*>(x), {M, K}, f32).to(at::kBFloat16);
  at::Tensor ym = at::from_blob(y, {M, N}, {ldy, 1}, f32);
  ym.copy_(at::mm(xm, transposed ? w_bf16.t() : w_bf16));
}

}  // namespace qmoe
