// Host entry points of the clusten CUDA extension: the three gather primitives.
// Shapes and math: clusten/reference.py. All tensors contiguous, on one CUDA device; float
// tensors share one dtype (float32, float64, float16 or bfloat16); indices int64.
#pragma once
#include <ATen/ATen.h>

namespace clusten {

// x: g x n x r x c, y: g x n_src x c, idx: b x n x m -> g x n x m x r
at::Tensor gather_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx);

// w: g x n x m x r, y: g x n_src x c, idx: b x n x m -> g x n x r x c
at::Tensor gather_sum(const at::Tensor& w, const at::Tensor& y, const at::Tensor& idx);

// w: g x n x m x r, x: g x n x r x c, idx: b x n x m -> g x n_src x c (float atomics)
at::Tensor scatter_sum_atomic(const at::Tensor& w, const at::Tensor& x, const at::Tensor& idx, int64_t n_src);

// Same sum in a fixed order (deterministic). order: (b*n*m) flat slots sorted by table row
// (b * n_src + idx), offsets: (b*n_src + 1) segment bounds into order.
at::Tensor scatter_sum_sorted(const at::Tensor& w, const at::Tensor& x, const at::Tensor& order,
                              const at::Tensor& offsets, int64_t n_src);

}  // namespace clusten
