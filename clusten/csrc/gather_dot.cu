// gather_dot: out[g,i,j,r] = sum_c x[g,i,r,c] * y[g, idx[b,i,j], c]   (b = g / heads)
// Used by clusten_qk (forward) and for the attention/weight gradients of the other ops.
// One thread per output element, scalar loop over channels, accumulation in opmath (fp32 for
// half types).
#include "clusten.h"
#include "common.cuh"

namespace clusten {

template <typename scalar_t>
__global__ void gather_dot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  const int64_t* __restrict__ idx, scalar_t* __restrict__ out, int64_t total,
                                  int64_t heads, int64_t n, int64_t m, int64_t r_size, int64_t c_size,
                                  int64_t n_src) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTEN_LOOP(item, total) {
    const int64_t r = item % r_size;
    int64_t rest = item / r_size;
    const int64_t j = rest % m;
    rest /= m;
    const int64_t i = rest % n;
    const int64_t g = rest / n;
    const int64_t src = idx[((g / heads) * n + i) * m + j];
    const scalar_t* x_row = x + ((g * n + i) * r_size + r) * c_size;
    const scalar_t* y_row = y + (g * n_src + src) * c_size;
    acc_t acc = 0;
    for (int64_t c = 0; c < c_size; ++c) {
      acc += static_cast<acc_t>(x_row[c]) * static_cast<acc_t>(y_row[c]);
    }
    out[item] = static_cast<scalar_t>(acc);
  }
}

at::Tensor gather_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx) {
  check_tensor(x, "x", 4);
  check_tensor(y, "y", 3);
  check_tensor(idx, "idx", 3);
  check_same(x, "x", y, "y");
  check_index(idx, "idx", x);
  const int64_t g = x.size(0), n = x.size(1), r = x.size(2), c = x.size(3);
  const int64_t b = idx.size(0), m = idx.size(2), n_src = y.size(1);
  TORCH_CHECK(b > 0 && g % b == 0 && idx.size(1) == n && y.size(0) == g && y.size(2) == c,
              "clusten gather_dot: inconsistent shapes");
  auto out = at::empty({g, n, m, r}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "clusten_gather_dot", [&] {
    gather_dot_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), total,
        g / b, n, m, r, c, n_src);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace clusten
