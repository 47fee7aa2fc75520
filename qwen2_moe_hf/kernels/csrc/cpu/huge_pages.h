// huge_page_tensors: byte tensors laid back to back in one anonymous mapping advised for 2 MiB pages.
//
// A decode step reads every weight once, in pieces of a few MiB (an expert's projection is 1.4 MiB of int4). From
// 4 KiB pages each 4 KiB of a stream is another TLB entry, a page walk that a VM makes twice as long, and a page
// boundary the hardware prefetchers do not cross; from 2 MiB pages the same reads ran 1.1x faster for a whole
// 4-layer model (docs/benchmarks.md). torch's allocator advises huge pages only when THP_MEM_ALLOC_ENABLE is set
// before torch starts, and a tensor under 2 MiB never fills one, so the model's weights are moved into these
// (loading/pages.py): many tensors per mapping, each at a 4 KiB boundary.
//
// Each tensor is its own storage (nothing looks shared to save_pretrained or safetensors) and unmaps its own
// pages when freed, so a mapping's memory goes back as its tensors go, not when the last one does. Where the
// kernel refuses the advice (THP "never", not Linux) the tensors are plain 4 KiB-page memory: same results.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <cerrno>
#include <cstring>
#endif

namespace qwen2_moe_hf {

constexpr int64_t kSmallPage = 4096;
constexpr int64_t kHugePage = 2 << 20;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Returns (tensors, advised): one uint8 tensor of nbytes[i] bytes per entry (uninitialised), and whether the
// mapping took the huge-page advice.
inline std::tuple<std::vector<at::Tensor>, bool> huge_page_tensors(const std::vector<int64_t>& nbytes) {
  int64_t total = 0;
  for (size_t i = 0; i < nbytes.size(); ++i) {
    // Public input: a negative or absurd size must not wrap the sums below.
    if (nbytes[i] < 0 || nbytes[i] > (int64_t{1} << 46)) {
      throw py::value_error("huge_page_tensors: nbytes[" + std::to_string(i) + "] = " + std::to_string(nbytes[i]) +
                            " is not a byte count between 0 and 2^46");
    }
    total += round_up(std::max<int64_t>(nbytes[i], 1), kSmallPage);
  }
  std::vector<at::Tensor> out;
  out.reserve(nbytes.size());
  auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
#if defined(__linux__)
  if (total == 0) return {out, false};
  // Over-map by one huge page, align the start, hand the slack back.
  const int64_t mapped = total + kHugePage;
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    throw std::runtime_error(std::string("huge_page_tensors: mmap of ") + std::to_string(mapped) +
                             " bytes failed: " + std::strerror(errno));
  }
  char* base = static_cast<char*>(raw);
  char* start = reinterpret_cast<char*>(round_up(reinterpret_cast<intptr_t>(base), kHugePage));
  if (start > base) munmap(base, start - base);
  char* end = start + total;
  if (base + mapped > end) munmap(end, base + mapped - end);
  const bool advised = madvise(start, total, MADV_HUGEPAGE) == 0;
  char* at = start;
  for (int64_t n : nbytes) {
    const int64_t span = round_up(std::max<int64_t>(n, 1), kSmallPage);
    out.push_back(at::from_blob(at, {n}, [span](void* p) { munmap(p, span); }, options));
    at += span;
  }
  return {out, advised};
#else
  for (int64_t n : nbytes) out.push_back(at::empty({n}, options));
  return {out, false};
#endif
}

}  // namespace qwen2_moe_hf
