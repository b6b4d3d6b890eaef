// scatter_sum: out[g,t,c] = sum over (i, j) with idx[b,i,j] == t of sum_r w[g,i,j,r] * x[g,i,r,c]
// The gradient of every op with respect to its gathered table (key, value, feat).
// Two variants: float atomics into an opmath buffer (fast, summation order not fixed), and a
// fixed-order segment sum over slots pre-sorted by table row (deterministic, no atomics).
#include "clusten.h"
#include "common.cuh"

namespace clusten {

template <typename scalar_t, typename acc_t>
__global__ void scatter_sum_atomic_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,
                                          const int64_t* __restrict__ idx, acc_t* __restrict__ out, int64_t total,
                                          int64_t heads, int64_t n, int64_t m, int64_t r_size, int64_t c_size,
                                          int64_t n_src) {
  CLUSTEN_LOOP(item, total) {  // item = ((g * n + i) * m + j) * c_size + c
    const int64_t c = item % c_size;
    int64_t rest = item / c_size;
    const int64_t j = rest % m;
    rest /= m;
    const int64_t i = rest % n;
    const int64_t g = rest / n;
    const int64_t dst = idx[((g / heads) * n + i) * m + j];
    const scalar_t* w_row = w + ((g * n + i) * m + j) * r_size;
    const scalar_t* x_col = x + (g * n + i) * r_size * c_size + c;
    acc_t acc = 0;
    for (int64_t r = 0; r < r_size; ++r) {
      acc += static_cast<acc_t>(w_row[r]) * static_cast<acc_t>(x_col[r * c_size]);
    }
    atomicAdd(out + (g * n_src + dst) * c_size + c, acc);
  }
}

template <typename scalar_t>
__global__ void scatter_sum_sorted_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,
                                          const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                          scalar_t* __restrict__ out, int64_t total, int64_t heads, int64_t n,
                                          int64_t m, int64_t r_size, int64_t c_size, int64_t n_src) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTEN_LOOP(item, total) {  // item = (g * n_src + t) * c_size + c
    const int64_t c = item % c_size;
    const int64_t row = item / c_size;
    const int64_t t = row % n_src;
    const int64_t g = row / n_src;
    const int64_t segment = (g / heads) * n_src + t;
    acc_t acc = 0;
    for (int64_t s = offsets[segment]; s < offsets[segment + 1]; ++s) {
      const int64_t slot = order[s];  // (b * n + i) * m + j
      const int64_t j = slot % m;
      const int64_t i = (slot / m) % n;
      const scalar_t* w_row = w + ((g * n + i) * m + j) * r_size;
      const scalar_t* x_col = x + (g * n + i) * r_size * c_size + c;
      for (int64_t r = 0; r < r_size; ++r) {
        acc += static_cast<acc_t>(w_row[r]) * static_cast<acc_t>(x_col[r * c_size]);
      }
    }
    out[item] = static_cast<scalar_t>(acc);
  }
}

static void check_scatter_args(const at::Tensor& w, const at::Tensor& x, int64_t n_src) {
  check_tensor(w, "w", 4);
  check_tensor(x, "x", 4);
  check_same(w, "w", x, "x");
  TORCH_CHECK(n_src >= 0, "clusten scatter_sum: n_src must be >= 0");
  TORCH_CHECK(x.size(0) == w.size(0) && x.size(1) == w.size(1) && x.size(2) == w.size(3),
              "clusten scatter_sum: inconsistent shapes");
}

at::Tensor scatter_sum_atomic(const at::Tensor& w, const at::Tensor& x, const at::Tensor& idx, int64_t n_src) {
  check_scatter_args(w, x, n_src);
  check_tensor(idx, "idx", 3);
  check_index(idx, "idx", w);
  const int64_t g = w.size(0), n = w.size(1), m = w.size(2), r = w.size(3), c = x.size(3);
  const int64_t b = idx.size(0);
  TORCH_CHECK(b > 0 && g % b == 0 && idx.size(1) == n && idx.size(2) == m,
              "clusten scatter_sum: inconsistent shapes");
  const auto acc_type = at::toOpMathType(w.scalar_type());
  auto buffer = at::zeros({g, n_src, c}, w.options().dtype(acc_type));
  const int64_t total = g * n * m * c;
  if (total > 0) {
    const c10::cuda::CUDAGuard guard(w.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "clusten_scatter_sum_atomic", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scatter_sum_atomic_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          w.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), buffer.data_ptr<acc_t>(), total,
          g / b, n, m, r, c, n_src);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return buffer.to(w.scalar_type());
}

at::Tensor scatter_sum_sorted(const at::Tensor& w, const at::Tensor& x, const at::Tensor& order,
                              const at::Tensor& offsets, int64_t n_src) {
  check_scatter_args(w, x, n_src);
  check_tensor(order, "order", 1);
  check_tensor(offsets, "offsets", 1);
  check_index(order, "order", w);
  check_index(offsets, "offsets", w);
  const int64_t g = w.size(0), n = w.size(1), m = w.size(2), r = w.size(3), c = x.size(3);
  const int64_t b = n_src > 0 ? (offsets.size(0) - 1) / n_src : 1;
  TORCH_CHECK(offsets.size(0) == b * n_src + 1 && b > 0 && g % b == 0 && order.size(0) == b * n * m,
              "clusten scatter_sum: order/offsets do not match the shapes");
  auto out = at::empty({g, n_src, c}, w.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const c10::cuda::CUDAGuard guard(w.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "clusten_scatter_sum_sorted", [&] {
    scatter_sum_sorted_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), total, g / b, n, m, r, c, n_src);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace clusten
