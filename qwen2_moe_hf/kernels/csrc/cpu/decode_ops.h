// The CPU ops a decode layer is made of, as C++ functions: registered as ops by their own files (decode_cpu.cpp,
// gptq_int4_cpu.cpp), and called directly by the whole-layer decode step (moe_ffn_cpu.cpp's decode_layer), which
// thereby computes exactly what the model's modules compute through the ops, one after another.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace qmoe {

// decode_cpu.cpp
at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const c10::optional<at::Tensor>& mask, double scaling);
// The same over positions [0, length) of key and value (-1: all of them), which may hold more: the decode layer's
// cache buffers, read in place without a view of their prefix.
at::Tensor decode_attention_prefix(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   int64_t length, const c10::optional<at::Tensor>& mask, double scaling);
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cos,
                                            const at::Tensor& sin);

// gptq_int4_cpu.cpp
at::Tensor gptq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, int64_t zero_offset,
                           const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> gptq_linears_cpu(const at::Tensor& x, at::TensorList linears,
                                         const c10::List<c10::optional<at::Tensor>>& biases, int64_t zero_offset);
// The same, with the weights kept between calls in `cache` (a DecodeLayerPack's: slot i for linears i; the
// single Linear's at `slot`); nullptr prepares them for the call, as the ops do.
class Int4WeightCache;
at::Tensor gptq_linear_kept(const at::Tensor& x, const at::Tensor* t, int64_t zero_offset,
                            const c10::optional<at::Tensor>& bias, Int4WeightCache* cache, size_t slot);
std::vector<at::Tensor> gptq_linears_kept(const at::Tensor& x, at::TensorList linears,
                                          const c10::List<c10::optional<at::Tensor>>& biases, int64_t zero_offset,
                                          Int4WeightCache* cache);

}  // namespace qmoe
