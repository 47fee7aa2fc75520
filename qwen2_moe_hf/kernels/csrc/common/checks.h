// Argument checks at the boundary of every compiled entry point (CPU and CUDA ops, the pybind functions).
//
// The ops are public (torch.ops.qwen2_moe_hf.*), so each one checks, itself, every tensor it takes a pointer
// from: defined, on the op's device, of an accepted dtype, of the expected rank and sizes, and with sizes that fit
// the integer types used inside. Layouts: a tensor that is not contiguous is copied to a contiguous one that the
// op keeps alive for the whole call (`contiguous()` below), so any strides give the right result; contiguous
// tensors are read in place. Index data (expert ids, g_idx) is range-checked by the ops that read it.
// Every failure raises c10::Error (RuntimeError in Python) naming the op, the argument and what was found.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace qmoe {

// A dtype as Python spells it (torch.float32), for messages read by Python users.
inline std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(s);
  }
}

// f(T{}) for T the C++ type of a dtype TensorArg::floating() accepts (float32, bfloat16, float16).
template <typename F>
void with_floating(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) f(at::BFloat16{});
  else if (dtype == at::kHalf) f(at::Half{});
  else f(float{});
}

// One tensor argument of an op. Checks chain: TensorArg(t, op, "qweight", device).dtype(at::kInt).dim(2)...
class TensorArg {
 public:
  TensorArg(at::Tensor tensor, const char* op, std::string name, const at::Device& device)
      : t_(std::move(tensor)), op_(op), name_(std::move(name)) {
    const at::Tensor& t = t_;
    TORCH_CHECK(t.defined(), op_, ": ", name_, " is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", name_, " must be a dense (strided) tensor, got layout ",
                t.layout());
    TORCH_CHECK(t.device().type() == device.type() && (!device.has_index() || !t.device().has_index() ||
                                                       t.device().index() == device.index()),
                op_, ": ", name_, " must be on ", device, ", got a tensor on ", t.device());
    // Meta / fake tensors never get here on their own (the dispatcher sends them to the fakes), but a list or an
    // optional argument can carry one beside real tensors; a CPU "tensor" without storage has no data.
    TORCH_CHECK(t.numel() == 0 || t.has_storage(), op_, ": ", name_, " has no data (a meta or fake tensor?)");
  }

  TensorArg& dtype(std::initializer_list<at::ScalarType> accepted, const char* what) {
    bool ok = false;
    for (at::ScalarType s : accepted) ok = ok || t_.scalar_type() == s;
    TORCH_CHECK(ok, op_, ": ", name_, " must be ", what, ", got ", dtype_name(t_.scalar_type()));
    return *this;
  }
  TensorArg& dtype(at::ScalarType s) {
    TORCH_CHECK(t_.scalar_type() == s, op_, ": ", name_, " must be ", dtype_name(s), ", got ",
                dtype_name(t_.scalar_type()));
    return *this;
  }
  TensorArg& floating() {
    return dtype({at::kFloat, at::kBFloat16, at::kHalf}, "torch.float32, torch.bfloat16 or torch.float16");
  }
  TensorArg& dim(int64_t d) {
    TORCH_CHECK(t_.dim() == d, op_, ": ", name_, " must be ", d, "-D, got shape ", t_.sizes());
    return *this;
  }
  // Exact sizes; -1 matches any size in that dimension. `match` names the arguments the sizes come from, so that
  // the message names them too (the fault may be theirs).
  TensorArg& sizes(std::initializer_list<int64_t> expected, const char* match = nullptr) {
    bool ok = static_cast<size_t>(t_.dim()) == expected.size();
    int64_t i = 0;
    for (int64_t s : expected) {
      ok = ok && (s < 0 || t_.size(i) == s);
      ++i;
    }
    TORCH_CHECK(ok, op_, ": ", name_, " must have shape ", shape_text(expected), match ? " to match " : "",
                match ? match : "", ", got ", t_.sizes());
    return *this;
  }
  TensorArg& numel(int64_t n, const char* match = nullptr) {
    TORCH_CHECK(t_.numel() == n, op_, ": ", name_, " must hold ", n, " values", match ? " to match " : "",
                match ? match : "", ", got shape ", t_.sizes());
    return *this;
  }
  // Every size fits in int32 (for ops that index with 32-bit integers).
  TensorArg& fits_int32() {
    TORCH_CHECK(t_.numel() <= INT32_MAX, op_, ": ", name_, " has ", t_.numel(), " elements, more than 2^31 - 1");
    return *this;
  }

  // The tensor to read: itself when contiguous, else a contiguous copy (the caller keeps it alive).
  at::Tensor contiguous() const { return t_.is_contiguous() ? t_ : t_.contiguous(); }
  const at::Tensor& tensor() const { return t_; }

 private:
  static std::string shape_text(std::initializer_list<int64_t> expected) {
    std::string s = "[";
    bool first = true;
    for (int64_t v : expected) {
      s += first ? "" : ", ";
      s += v < 0 ? std::string("*") : std::to_string(v);
      first = false;
    }
    return s + "]";
  }

  at::Tensor t_;
  const char* op_;
  std::string name_;
};

// Limits of the expert-dispatch ops (topk_softmax, moe_align, moe_combine) shared by the CPU and CUDA twins:
// the CUDA top-k keeps a row of E probabilities per warp in shared memory (4 warps x E floats <= 48 KiB), and
// slot numbers, padded offsets and the sentinel are int32.
constexpr int64_t kMaxExperts = 3072;
constexpr int64_t kMaxAlignBlock = 1 << 16;

// a * b, raising (naming the op and `what`) instead of overflowing int64.
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " (", a, " x ", b,
              ") overflows a 64-bit size");
  return r;
}

// a + b for sizes, raising instead of overflowing int64.
inline int64_t checked_add(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, &r), op, ": ", what, " (", a, " + ", b,
              ") overflows a 64-bit size");
  return r;
}

// An integer argument in [lo, hi].
inline void check_range(int64_t v, int64_t lo, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(v >= lo && v <= hi, op, ": ", name, "=", v, " must be in [", lo, ", ", hi, "]");
}

}  // namespace qmoe
