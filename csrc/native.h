// Declarations shared by the native sources and the Python bindings. Nothing here depends on
// Python or torch: kernels take raw pointers, shapes and a stream, and their framework-free
// templates live in csrc/kernels/*.cuh.
#pragma once

#include <string>
#include <vector>

#include "build_config.h"

namespace mmgen {

// How this library was compiled.
struct BuildInfo {
  std::string version;                  // package version, from pyproject.toml
  std::string compiler;                 // host C++ compiler, "<id> <version>"
  bool cuda;                            // CUDA sources compiled in
  std::vector<std::string> cuda_archs;  // CMake CUDA architectures, empty without CUDA
  std::string cuda_toolkit;             // CUDA toolkit version, empty without CUDA
};

BuildInfo build_info();  // csrc/cpu/build_info.cpp

#if MMGEN_WITH_CUDA
// csrc/cuda/device.cu
int cuda_runtime_version();  // CUDART_VERSION style: 1000 * major + 10 * minor
int cuda_device_count();     // 0 when there is no driver or no device; throws on other errors
#endif

}  // namespace mmgen
