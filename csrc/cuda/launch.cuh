// The CUDA side of the kernels' host dispatch: run_*(params, ..., launch) in csrc/kernels picks an
// instantiation and calls launch(kernel, grid, block, params); here that is a <<<>>> launch on the
// caller's stream, checked. (The tests pass the CPU emulator's launch instead.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mmgen {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t to_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

struct CudaLaunch {
  cudaStream_t stream;
  const char* name;

  template <class Params>
  void operator()(void (*kernel)(Params), dim3 grid, dim3 block, const Params& params) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // nothing to do (an empty batch)
    kernel<<<grid, block, 0, stream>>>(params);
    check_cuda(cudaGetLastError(), name);
  }
};

}  // namespace mmgen
