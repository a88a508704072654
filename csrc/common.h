// Host-side helpers for the Tensor-level code in csrc/<family>/<family>.cpp: argument checks that
// name the argument and the expectation, and the Tensor -> launcher dtype mapping.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

// A norm's epsilon: finite and >= 0 (a negative or infinite one turns every row into plausible numbers).
inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "dots1_ext: eps must be finite and >= 0, got ", eps);
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
  TORCH_CHECK_VALUE(t.device() == ref.device(), "dots1_ext: ", name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  DOTS1_CHECK(t.dim() == 0 || t.stride(-1) == 1, name, " must have a contiguous last dimension, got strides ",
              t.strides());
}

// ---- Memory overlap of the tensors an in-place op writes (checked before any write) ----
//
// ATen's at::has_internal_overlap / get_overlap_status answer "too hard" for the strided views these
// ops take (q and k as column views of one fused QKV buffer), so the checks below decide those
// layouts exactly: views whose last dim is contiguous and whose other dims share strides (the fused
// QKV, head-padded and transposed layouts), plus a conservative answer ("may overlap") for layouts
// they cannot decide, which are rejected with a message that says so.

enum class Overlap { kNo, kYes, kMaybe };

// Whether t's elements are pairwise distinct in memory: a stride-0 (expanded) dim of size > 1 is
// overlap; otherwise the dims of size > 1, sorted by |stride|, must each step past everything the
// inner ones cover (a sufficient condition; layouts that fail it are reported as kMaybe).
inline Overlap internal_overlap(const at::Tensor& t) {
  if (t.numel() <= 1) return Overlap::kNo;
  if (at::has_internal_overlap(t) == at::MemOverlap::Yes) return Overlap::kYes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(std::llabs(t.stride(d)), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // elements spanned by the dims so far, inclusive
  for (const auto& [stride, size] : dims) {
    if (stride == 0) return Overlap::kYes;
    if (stride < extent) return Overlap::kMaybe;
    extent = stride * (size - 1) + extent;
  }
  return Overlap::kNo;
}

// Whether a and b (same dtype and rank) share an element. Exact when their last dims are contiguous
// and every other dim where either has size > 1 has the same stride in both, with at most two such
// dims; a disjoint span or distinct storage is always kNo; anything else that might touch is kMaybe.
inline Overlap mutual_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return Overlap::kNo;
  if (!a.storage().is_alias_of(b.storage())) return Overlap::kNo;
  if (a.element_size() != b.element_size() || a.dim() != b.dim() || a.dim() == 0) return Overlap::kMaybe;
  const auto span = [](const at::Tensor& t, int64_t* lo, int64_t* hi) {
    *lo = *hi = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t reach = t.stride(d) * (t.size(d) - 1);
      (reach < 0 ? *lo : *hi) += reach;
    }
  };
  int64_t alo, ahi, blo, bhi;
  span(a, &alo, &ahi);
  span(b, &blo, &bhi);
  if (ahi < blo || bhi < alo) return Overlap::kNo;
  const int64_t last = a.dim() - 1;
  const int64_t Da = a.size(last), Db = b.size(last);
  if ((Da > 1 && a.stride(last) != 1) || (Db > 1 && b.stride(last) != 1)) return Overlap::kMaybe;
  // Offsets: a_base + sum_d i_d s_d + x (x < Da) and b_base + sum_d j_d s_d + y (y < Db) meet iff
  // c + sum_d (i_d - j_d) s_d lies in (-Da, Db) with c = a_base - b_base.
  struct Dim {
    int64_t stride, lo, hi;  // i - j ranges over [lo, hi]
  };
  std::vector<Dim> dims;
  for (int64_t d = 0; d < last; ++d) {
    const int64_t sa = a.size(d), sb = b.size(d);
    if (sa == 1 && sb == 1) continue;
    int64_t stride;
    if (sa > 1 && sb > 1) {
      if (a.stride(d) != b.stride(d)) return Overlap::kMaybe;
      stride = a.stride(d);
    } else {
      stride = sa > 1 ? a.stride(d) : b.stride(d);
    }
    dims.push_back({stride, -(sb - 1), sa - 1});
  }
  if (dims.size() > 2) return Overlap::kMaybe;
  const int64_t c = a.storage_offset() - b.storage_offset();
  const auto hits = [&](int64_t v) { return v > -Da && v < Db; };
  // Is there n in [lo, hi] with hits(base + n * stride)? Only the n nearest to -base / stride can.
  const auto solve = [&](int64_t base, const Dim& dim) {
    if (dim.stride == 0) return hits(base);
    const auto floor_div = [](int64_t p, int64_t q) { return p / q - ((p % q != 0) && ((p < 0) != (q < 0))); };
    const int64_t n0 = floor_div(-base, dim.stride);
    for (int64_t n = n0 - 1; n <= n0 + 1; ++n)
      if (n >= dim.lo && n <= dim.hi && hits(base + n * dim.stride)) return true;
    // Strides below the block width can hit further away: scan (bounded by the block width).
    if (std::llabs(dim.stride) < std::max(Da, Db))
      for (int64_t n = dim.lo; n <= dim.hi; ++n)
        if (hits(base + n * dim.stride)) return true;
    return false;
  };
  if (dims.empty()) return hits(c) ? Overlap::kYes : Overlap::kNo;
  if (dims.size() == 1) return solve(c, dims[0]) ? Overlap::kYes : Overlap::kNo;
  // Two dims: enumerate the one with fewer values, solve the other.
  const Dim& outer = (dims[0].hi - dims[0].lo) <= (dims[1].hi - dims[1].lo) ? dims[0] : dims[1];
  const Dim& inner = &outer == &dims[0] ? dims[1] : dims[0];
  if (outer.hi - outer.lo > (1 << 16)) return Overlap::kMaybe;
  for (int64_t n = outer.lo; n <= outer.hi; ++n)
    if (solve(c + n * outer.stride, inner)) return Overlap::kYes;
  return Overlap::kNo;
}

// Raises (naming the argument) if `t`, which an in-place op writes, has elements sharing memory.
inline void check_no_internal_overlap(const at::Tensor& t, const char* name) {
  const Overlap o = internal_overlap(t);
  TORCH_CHECK_VALUE(o != Overlap::kYes, "dots1_ext: ", name, " is written in place but some of its elements share memory (an expanded or ",
              "stride-0 view?), strides ", t.strides(), " for shape ", t.sizes(), "; pass a tensor with distinct elements");
  TORCH_CHECK_VALUE(o != Overlap::kMaybe, "dots1_ext: ", name, " is written in place and its layout (strides ", t.strides(), " for shape ",
              t.sizes(), ") cannot be proven free of self-overlap; pass a contiguous tensor");
}

// Raises (naming both arguments) if a and b, at least one of them written in place, share memory.
inline void check_no_overlap(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  const Overlap o = mutual_overlap(a, b);
  TORCH_CHECK_VALUE(o != Overlap::kYes, "dots1_ext: ", a_name, " and ", b_name, " overlap in memory; this in-place op needs them disjoint");
  TORCH_CHECK_VALUE(o != Overlap::kMaybe, "dots1_ext: ", a_name, " and ", b_name, " share a storage in a layout (strides ", a.strides(),
              " and ", b.strides(), ") that cannot be proven disjoint; pass separate tensors");
}

// DOTS1_EXT_PDL (read per call; default 1): whether the CUDA wrappers launch the decode kernels with
// programmatic dependent launch (csrc/pdl.cuh; applied on sm_90+ only). 0 launches them plainly
// (benchmarks compare the two; the results are bitwise the same). Any other value raises ValueError.
inline bool pdl_enabled() {
  const char* v = std::getenv("DOTS1_EXT_PDL");
  if (v == nullptr || *v == '\0') return true;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "0" || s == "1", "dots1_ext: DOTS1_EXT_PDL must be 0 or 1, got '", s, "'");
  return s == "1";
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
