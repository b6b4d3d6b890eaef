// gather_sum: out[g,i,r,c] = sum_j w[g,i,j,r] * y[g, idx[b,i,j], c]   (b = g / heads)
// Forward of clusten_av, clusten_wf, weighted_gather and msdetrpc; the query gradient of
// clusten_qk. One thread per output element (adjacent threads read adjacent channels of the
// same neighbour row), accumulation in opmath (fp32 for half types).
#include "clusten.h"
#include "common.cuh"

namespace clusten {

template <typename scalar_t>
__global__ void gather_sum_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ y,
                                  const int64_t* __restrict__ idx, scalar_t* __restrict__ out, int64_t total,
                                  int64_t heads, int64_t n, int64_t m, int64_t r_size, int64_t c_size,
                                  int64_t n_src) {
  using acc_t = at::opmath_type<scalar_t>;
  CLUSTEN_LOOP(item, total) {
    const int64_t c = item % c_size;
    int64_t rest = item / c_size;
    const int64_t r = rest % r_size;
    rest /= r_size;
    const int64_t i = rest % n;
    const int64_t g = rest / n;
    const int64_t* idx_row = idx + ((g / heads) * n + i) * m;
    const scalar_t* w_row = w + (g * n + i) * m * r_size + r;
    const scalar_t* y_table = y + g * n_src * c_size + c;
    acc_t acc = 0;
    for (int64_t j = 0; j < m; ++j) {
      acc += static_cast<acc_t>(w_row[j * r_size]) * static_cast<acc_t>(y_table[idx_row[j] * c_size]);
    }
    out[item] = static_cast<scalar_t>(acc);
  }
}

at::Tensor gather_sum(const at::Tensor& w, const at::Tensor& y, const at::Tensor& idx) {
  check_tensor(w, "w", 4);
  check_tensor(y, "y", 3);
  check_tensor(idx, "idx", 3);
  check_same(w, "w", y, "y");
  check_index(idx, "idx", w);
  const int64_t g = w.size(0), n = w.size(1), m = w.size(2), r = w.size(3);
  const int64_t b = idx.size(0), c = y.size(2), n_src = y.size(1);
  TORCH_CHECK(b > 0 && g % b == 0 && idx.size(1) == n && idx.size(2) == m && y.size(0) == g,
              "clusten gather_sum: inconsistent shapes");
  auto out = at::empty({g, n, r, c}, w.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const c10::cuda::CUDAGuard guard(w.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "clusten_gather_sum", [&] {
    gather_sum_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), total,
        g / b, n, m, r, c, n_src);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace clusten
