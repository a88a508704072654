// Host-side helpers for the Tensor-level code in csrc/<family>/<family>.cpp: argument checks that
// name the argument and the expectation, and the Tensor -> launcher dtype mapping.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "dtype.h"

#define DOTS1_CHECK(cond, ...) TORCH_CHECK((cond), "dots1_ext: ", __VA_ARGS__)

namespace dots1 {

inline std::string dtypes_str(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream os;
  bool first = true;
  for (auto t : allowed) {
    os << (first ? "" : " or ") << c10::toString(t);
    first = false;
  }
  return os.str();
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  TORCH_CHECK_TYPE(false, "dots1_ext: ", name, " must have dtype ", dtypes_str(allowed), ", got ",
                   c10::toString(t.scalar_type()));
}

// Checks t.sizes() against `expected`; -1 matches any size. The message names the tensor and both shapes.
inline void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  if (ok) {
    int64_t i = 0;
    for (auto e : expected) {
      if (e != -1 && t.size(i) != e) ok = false;
      ++i;
    }
  }
  if (!ok) {
    std::ostringstream os;
    os << "[";
    int64_t i = 0;
    for (auto e : expected) os << (i++ ? ", " : "") << (e == -1 ? std::string("*") : std::to_string(e));
    os << "]";
    TORCH_CHECK_VALUE(false, "dots1_ext: ", name, " must have shape ", os.str(), ", got ", t.sizes());
  }
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  DOTS1_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  DOTS1_CHECK(t.dim() == 0 || t.stride(-1) == 1, name, " must have a contiguous last dimension, got strides ",
              t.strides());
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dots1_ext: unsupported dtype ", c10::toString(t));
  }
}

}  // namespace dots1
