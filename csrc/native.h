// Declarations shared by the native sources and the Python bindings. Nothing here depends on
// Python or torch: kernels take raw pointers, shapes and a stream, and their framework-free
// templates live in csrc/kernels/*.cuh (argument blocks in csrc/kernels/params.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "build_config.h"
#include "kernels/params.h"

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

// Kernel launchers, csrc/cuda/*.cu: enqueue on `stream` (a cudaStream_t) and return; launch
// errors throw std::runtime_error. `vectorized`: the caller checked that every pointer is 16-byte
// aligned and every row stride a multiple of 16 bytes.
void decode_attention(const kernels::DecodeAttentionParams& p, kernels::DType dtype, bool vectorized,
                      std::uintptr_t stream);
void layer_norm(const kernels::LayerNormParams& p, kernels::DType dtype, bool weight_fp32, bool vectorized,
                std::uintptr_t stream);
void token_gather(const kernels::TokenGatherParams& p, kernels::DType dtype, bool vectorized,
                  std::uintptr_t stream);
void sample(const kernels::SampleParams& p, kernels::DType dtype, std::uintptr_t stream);
#endif

}  // namespace mmgen
