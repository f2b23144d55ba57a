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
  m.doc() = "mmgen_engine native library (C++ CPU and CUDA kernels, no libtorch)";

  const mmgen::BuildInfo info = mmgen::build_info();
  m.attr("__version__") = info.version;
  m.attr("compiler") = info.compiler;
  m.attr("cuda") = info.cuda;
  m.attr("cuda_archs") = py::tuple(py::cast(info.cuda_archs));
  m.attr("cuda_toolkit") = info.cuda ? py::object(py::str(info.cuda_toolkit)) : py::none();

  py::list isas;
  for (mmgen::CpuIsa isa : mmgen::cpu_isas()) isas.append(static_cast<int>(isa));
  m.attr("cpu_isas") = py::tuple(isas);  // CpuIsa codes this build and CPU run, widest last
  m.attr("cpu_openmp") = mmgen::cpu_openmp();
  m.attr("GEMV_MAX_ROWS") = mmgen::kGemvMaxRows;
  m.def(
      "gemv",
      [](std::uintptr_t x, int64_t ldx, std::uintptr_t w, int weight, std::uintptr_t scale, int64_t group_size,
         std::uintptr_t bias, std::uintptr_t y, int64_t ldy, int64_t rows, int64_t n, int64_t k, int threads,
         int isa) {
        const mmgen::GemvParams p{reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const void*>(w),
                                  reinterpret_cast<const float*>(scale), group_size,
                                  reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), ldy,
                                  rows, n, k};
        mmgen::gemv(p, static_cast<mmgen::GemvWeight>(weight), threads, static_cast<mmgen::CpuIsa>(isa));
      },
      "Few-row product y = x W^T (+ bias) with an int8 (weight=0) or bfloat16 (weight=1) weight widened "
      "in registers (csrc/cpu/gemv.cpp); CPU pointers as ints.",
      py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("weight"), py::arg("scale"), py::arg("group_size"),
      py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("rows"), py::arg("n"), py::arg("k"),
      py::arg("threads"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());

#if MMGEN_WITH_CUDA
  m.def("cuda_runtime_version", &mmgen::cuda_runtime_version,
        "Version of the linked CUDA runtime, 1000 * major + 10 * minor.");
  m.def("cuda_device_count", &mmgen::cuda_device_count,
        "Number of visible CUDA devices; 0 without a driver or a device.");
  mmgen::bind_kernels<CudaOps>(m);
#endif
}
