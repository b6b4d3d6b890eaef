// Python bindings of the clusten CUDA extension (built by clusten/build.py).
#include <torch/extension.h>

#include "clusten.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clusten gather primitives (CUDA); see clusten/reference.py for shapes and math";
  m.def("gather_dot", &clusten::gather_dot, "out[g,i,j,r] = sum_c x[g,i,r,c] * y[g,idx[b,i,j],c]");
  m.def("gather_sum", &clusten::gather_sum, "out[g,i,r,c] = sum_j w[g,i,j,r] * y[g,idx[b,i,j],c]");
  m.def("scatter_sum_atomic", &clusten::scatter_sum_atomic, "table gradient by float atomics");
  m.def("scatter_sum_sorted", &clusten::scatter_sum_sorted, "table gradient by a fixed-order segment sum");
}
