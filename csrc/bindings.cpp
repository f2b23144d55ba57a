// Python bindings of the native library: the module mmgen_engine._C. Only argument conversion
// lives here; mmgen_engine/_native.py is its Python face.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "native.h"
#if MMGEN_WITH_CUDA
#include "kernel_bindings.h"
#endif

namespace py = pybind11;

#if MMGEN_WITH_CUDA
namespace {

// The CUDA launchers of csrc/cuda, as bind_kernels wants them.
struct CudaOps {
  static constexpr auto decode_attention = &mmgen::decode_attention;
  static constexpr auto layer_norm = &mmgen::layer_norm;
  static constexpr auto token_gather = &mmgen::token_gather;
  static constexpr auto sample = &mmgen::sample;
};

}  // namespace
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmgen_engine native library (C++/CUDA kernels, no libtorch)";

  const mmgen::BuildInfo info = mmgen::build_info();
  m.attr("__version__") = info.version;
  m.attr("compiler") = info.compiler;
  m.attr("cuda") = info.cuda;
  m.attr("cuda_archs") = py::tuple(py::cast(info.cuda_archs));
  m.attr("cuda_toolkit") = info.cuda ? py::object(py::str(info.cuda_toolkit)) : py::none();

#if MMGEN_WITH_CUDA
  m.def("cuda_runtime_version", &mmgen::cuda_runtime_version,
        "Version of the linked CUDA runtime, 1000 * major + 10 * minor.");
  m.def("cuda_device_count", &mmgen::cuda_device_count,
        "Number of visible CUDA devices; 0 without a driver or a device.");
  mmgen::bind_kernels<CudaOps>(m);
#endif
}
