// Shared launch helpers and argument checks for the clusten kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace clusten {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

// Number of blocks for `total` work items (1-D grid: no gridDim.y/z limit applies).
inline unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

// 64-bit grid-stride loop over [0, total).
#define CLUSTEN_LOOP(item, total)                                                   \
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < (total); \
       item += int64_t(blockDim.x) * gridDim.x)

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "clusten: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "clusten: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, "clusten: ", name, " must have rank ", dim, ", got ", t.dim());
}

inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "clusten: ", b_name, " is ", b.scalar_type(), " but ", a_name,
              " is ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "clusten: ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device());
}

inline void check_index(const at::Tensor& idx, const char* name, const at::Tensor& like) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "clusten: ", name, " must be int64");
  TORCH_CHECK(idx.device() == like.device(), "clusten: ", name, " is on ", idx.device(), " but data is on ",
              like.device());
}

}  // namespace clusten
