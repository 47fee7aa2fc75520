// IdentityWatch: "does dicts[i].get(keys[i]) still return expected[i] (by identity), for every i, and is every dict
// of `empty` still empty?" in one call.
//
// The MoE layer's prepared weights (qwen2_moe_hf/moe/weights.py) ask this before every forward, over each expert's
// module and tensor slots (~600 entries for a bf16 layer of 60 experts, ~1200 for int4), so that a replaced module
// or tensor is seen. In decode the dicts are cold in cache (a step reads ~GBs of weights in between), and the
// lookups are a chain of dependent misses: dict -> keys table -> entry -> value. Python's map(dict.get, ...) pays
// ~100 µs per layer for that; a plain C loop ~50 µs; prefetching every dict and its keys table first, then looking
// up, ~20 µs (measured on Zen 5 after a 64 MiB read). The semantics are exactly the Python check's: a missing key
// reads as None, dict subclasses are looked up without their __getitem__ / __missing__, as dict.get does.
//
// Where CPython keeps a per-dict version (PEP 509's ma_version_tag, changed by every modification of the dict;
// CPython <= 3.11 here, where it is not deprecated), a check first compares each dict's version with the one it had
// when every slot last held: all unchanged, nothing has moved, and the lookups are skipped (one cache line per dict
// instead of a chain per slot). Any change to a dict (a watched slot or any other) sends the check through the full
// lookups, which record the versions again when every slot holds.
//
// The decode layer's plan (moe/decode_layer.py) adds its modules' hook dicts as `empty` (a hook registered since is
// seen) and its scalar attributes (training, eps, ...) as slots of the modules' __dict__.
//
// It holds strong references to every dict, key and expected object, so none can be freed and its address reused
// while the watch lives (the identity test is sound), and it checks every argument at construction: the lists
// are public input.
#pragma once

#include <Python.h>
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#if !defined(Py_LIMITED_API) && PY_VERSION_HEX < 0x030C0000
#define QMOE_DICT_VERSIONS 1
#endif

namespace qwen2_moe_hf {

class IdentityWatch {
 public:
  IdentityWatch(const py::list& dicts, const py::list& keys, const py::list& expected,
                const py::list& empty = py::list()) {
    const size_t n = dicts.size();
    if (keys.size() != n || expected.size() != n) {
      throw py::value_error("IdentityWatch: dicts, keys and expected must have one length (got " +
                            std::to_string(n) + ", " + std::to_string(keys.size()) + ", " +
                            std::to_string(expected.size()) + ")");
    }
    dicts_.reserve(n);
    keys_.reserve(n);
    expected_.reserve(n);
    std::unordered_set<PyObject*> seen;
    for (size_t i = 0; i < n; ++i) {
      py::object d = dicts[i], k = keys[i], e = expected[i];
      if (!PyDict_Check(d.ptr())) {
        throw py::type_error("IdentityWatch: dicts[" + std::to_string(i) + "] must be a dict, not " +
                             std::string(Py_TYPE(d.ptr())->tp_name));
      }
      // Exact str only: its hash is cached and cannot run Python code or raise during current().
      if (!PyUnicode_CheckExact(k.ptr())) {
        throw py::type_error("IdentityWatch: keys[" + std::to_string(i) + "] must be a str, not " +
                             std::string(Py_TYPE(k.ptr())->tp_name));
      }
      if (PyObject_Hash(k.ptr()) == -1) throw py::error_already_set();
      if (seen.insert(d.ptr()).second) unique_dicts_.push_back(d);
      dicts_.push_back(std::move(d));
      keys_.push_back(std::move(k));
      expected_.push_back(std::move(e));
    }
    for (size_t i = 0; i < empty.size(); ++i) {
      py::object d = empty[i];
      if (!PyDict_Check(d.ptr())) {
        throw py::type_error("IdentityWatch: empty[" + std::to_string(i) + "] must be a dict, not " +
                             std::string(Py_TYPE(d.ptr())->tp_name));
      }
      empty_.push_back(std::move(d));
    }
    seen_.assign(unique_dicts_.size(), kNever);
  }

  // True while every slot still holds its expected object. Called with the GIL held (pybind's default).
  bool current() const {
    for (const py::object& d : empty_) __builtin_prefetch(d.ptr());
    for (const py::object& d : unique_dicts_) __builtin_prefetch(d.ptr());
    for (const py::object& d : empty_) {
      if (PyDict_GET_SIZE(d.ptr()) != 0) return false;
    }
#ifdef QMOE_DICT_VERSIONS
    bool unchanged = true;
    for (size_t u = 0; u < unique_dicts_.size(); ++u) unchanged &= version(unique_dicts_[u]) == seen_[u];
    if (unchanged) return true;
#endif
#if !defined(Py_LIMITED_API) && PY_VERSION_HEX < 0x030E0000
    // The keys tables (where the lookups go first); read only to prefetch: a stale pointer cannot fault here.
    for (const py::object& d : unique_dicts_) {
      const char* table = reinterpret_cast<const char*>(reinterpret_cast<PyDictObject*>(d.ptr())->ma_keys);
      __builtin_prefetch(table);
      __builtin_prefetch(table + 64);
      __builtin_prefetch(table + 128);
      __builtin_prefetch(table + 192);
    }
#endif
    const size_t n = dicts_.size();
    for (size_t i = 0; i < n; ++i) {
      PyObject* value = PyDict_GetItemWithError(dicts_[i].ptr(), keys_[i].ptr());  // borrowed
      if (value == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        value = Py_None;
      }
      if (value != expected_[i].ptr()) return false;
    }
#ifdef QMOE_DICT_VERSIONS
    for (size_t u = 0; u < unique_dicts_.size(); ++u) seen_[u] = version(unique_dicts_[u]);
#endif
    return true;
  }

  size_t size() const { return dicts_.size(); }

 private:
  static constexpr uint64_t kNever = UINT64_MAX;  // no full check has passed yet
#ifdef QMOE_DICT_VERSIONS
  static uint64_t version(const py::object& d) { return reinterpret_cast<PyDictObject*>(d.ptr())->ma_version_tag; }
#endif

  std::vector<py::object> dicts_, keys_, expected_, unique_dicts_, empty_;
  mutable std::vector<uint64_t> seen_;  // per unique dict: its version when every slot last held
};

inline void register_identity_watch(py::module& m) {
  py::class_<IdentityWatch>(m, "IdentityWatch")
      .def(py::init<const py::list&, const py::list&, const py::list&, const py::list&>(), py::arg("dicts"),
           py::arg("keys"), py::arg("expected"), py::arg("empty") = py::list())
      .def("current", &IdentityWatch::current)
      .def("__len__", &IdentityWatch::size);
}

}  // namespace qwen2_moe_hf
