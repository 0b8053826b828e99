// Host-side helpers shared by the op implementations (*_ops.cpp) of every family: row layouts
// of (..., V) tensors, dtype codes. Light ATen headers only (no torch/extension.h).
#pragma once

#include "args.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace pydistill {

// Rows of a (..., V) tensor addressed as base + (row / n_inner) * stride_outer +
// (row % n_inner) * stride_inner: contiguous rows and slices such as logits[:, :-1] need no
// copy; anything else is made contiguous. The port of _row_layouts in
// kernels/softmax_divergence.py.
struct RowLayout {
  at::Tensor x;  // unit stride along V
  int64_t stride_outer = 0, stride_inner = 0;
};

inline bool merged_leading_dims(const at::Tensor& x, std::vector<std::pair<int64_t, int64_t>>& dims) {
  dims.clear();
  for (int64_t i = 0; i + 1 < x.dim(); ++i) {
    const int64_t size = x.size(i), stride = x.stride(i);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == stride * size) {
      dims.back() = {dims.back().first * size, stride};
    } else {
      dims.emplace_back(size, stride);
    }
  }
  return dims.size() <= 2;
}

// One layout for one tensor, or for two of the same shape that must share n_inner.
inline int64_t row_layouts(const at::Tensor& a_in, RowLayout& a, const at::Tensor* b_in, RowLayout* b) {
  a.x = a_in.stride(-1) == 1 ? a_in : a_in.contiguous();
  std::vector<std::pair<int64_t, int64_t>> da, db;
  bool ok = merged_leading_dims(a.x, da);
  if (b_in) {
    b->x = b_in->stride(-1) == 1 ? *b_in : b_in->contiguous();
    ok = merged_leading_dims(b->x, db) && ok;
    if (ok && da.size() == 2 && db.size() == 2 && da[1].first != db[1].first) ok = false;
  }
  if (!ok) {
    a.x = a_in.contiguous();
    const int64_t V = a.x.size(-1), n = V ? a.x.numel() / V : 0;
    da.assign(1, {n, V});
    if (b_in) {
      b->x = b_in->contiguous();
      db = da;
    }
  }
  const std::vector<std::pair<int64_t, int64_t>>* two =
      da.size() == 2 ? &da : (b_in && db.size() == 2 ? &db : nullptr);
  const int64_t n_inner = two ? (*two)[1].first : 1;
  auto strides = [&](const std::vector<std::pair<int64_t, int64_t>>& d, RowLayout& l) {
    if (d.size() == 2) {
      l.stride_outer = d[0].second;
      l.stride_inner = d[1].second;
    } else {
      const int64_t rs = d.empty() ? 0 : d[0].second;
      l.stride_outer = n_inner * rs;
      l.stride_inner = rs;
    }
  };
  strides(da, a);
  if (b_in) strides(db, *b);
  return n_inner;
}

inline at::Tensor labels_as_int64(const c10::optional<at::Tensor>& labels, int64_t n_rows) {
  if (!labels.has_value()) return at::Tensor();
  at::Tensor y = labels->reshape({-1}).to(at::kLong).contiguous();
  TORCH_CHECK(y.numel() == n_rows, "labels: expected ", n_rows, " elements, got ", y.numel());
  return y;
}

// A per-row gradient factor as float32 (N elements or one broadcast element), any stride.
inline at::Tensor row_factors(const at::Tensor& scale, int64_t n_rows, int64_t& stride) {
  at::Tensor s = scale.to(at::kFloat).reshape({-1});
  TORCH_CHECK(s.numel() == n_rows || s.numel() == 1, "expected ", n_rows,
              " per-row gradient factors (or one), got ", s.numel());
  stride = s.numel() == 1 ? 0 : s.stride(0);
  return s;
}

inline DType dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kHalf: return F16;
    case at::kBFloat16: return BF16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t);
  }
}

// One model's logit transform from an op's (scale, softcap) pair; `side` names the model in
// errors ("student", "teacher").
inline LogitTransform logit_transform(double scale, const c10::optional<double>& cap,
                                     const char* side) {
  TORCH_CHECK(scale > 0 && std::isfinite(scale), side, "_scale: expected a finite value > 0, got ",
              scale);
  TORCH_CHECK(!cap.has_value() || (*cap > 0 && std::isfinite(*cap)), side,
              "_softcap: expected None or a finite value > 0, got ", cap.has_value() ? *cap : 0.0);
  LogitTransform f;
  f.scale = static_cast<float>(scale);
  f.has_cap = cap.has_value();
  f.cap = f.has_cap ? static_cast<float>(*cap) : 1.0f;
  return f;
}

inline void check_launch(const char* error) {
  TORCH_CHECK(error == nullptr, "pydistill CUDA kernel: ", error ? error : "");
}

}  // namespace pydistill

