// Python bindings of mlaserve.worker.kernels._C — bindings only; the kernels live in their own files.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mlaserve paged MLA decode kernels for Hopper (sm_90a); takes raw pointers, links no torch";
  m.attr("ARCH") = "sm_90a";
}
