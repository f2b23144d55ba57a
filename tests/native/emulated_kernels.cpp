// The kernels of csrc/kernels, compiled with the host compiler and run by the CPU emulator
// (simt.h), behind the same Python bindings as the CUDA build (csrc/kernel_bindings.h). The tests
// swap this module in for mmgen_engine._C and call the real wrappers of mmgen_engine.ops.cuda_ops
// with CPU tensors: argument checks, instantiation choice, launch configuration and kernel logic are
// all the production code; only the launch itself is the emulator's.
#include "kernel_bindings.h"  // pybind11 before simt.h's macros

#include "simt.h"

#include "kernels/decode_attention.cuh"
#include "kernels/layer_norm.cuh"
#include "kernels/sampling.cuh"
#include "kernels/token_gather.cuh"

namespace {

using namespace mmgen::kernels;

struct EmulatedLaunch {
  template <class Params>
  void operator()(void (*kernel)(Params), dim3 grid, dim3 block, const Params& params) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // as CudaLaunch
    simt::launch(kernel, grid, block, 0, params);
  }
};

struct EmulatedOps {
  static void decode_attention(const DecodeAttentionParams& p, DType dtype, bool vectorized, std::uintptr_t) {
    dispatch_decode_attention(p, dtype, vectorized, EmulatedLaunch{});
  }
  static void layer_norm(const LayerNormParams& p, DType dtype, bool weight_fp32, bool vectorized, std::uintptr_t) {
    dispatch_layer_norm(p, dtype, weight_fp32, vectorized, EmulatedLaunch{});
  }
  static void token_gather(const TokenGatherParams& p, DType dtype, bool vectorized, std::uintptr_t) {
    dispatch_token_gather(p, dtype, vectorized, EmulatedLaunch{});
  }
  static void sample(const SampleParams& p, DType dtype, std::uintptr_t) {
    dispatch_sample(p, dtype, EmulatedLaunch{});
  }
};

}  // namespace

PYBIND11_MODULE(_emulated_kernels, m) {
  m.doc() = "csrc/kernels run on the CPU by tests/native/simt.h (tests only)";
  mmgen::bind_kernels<EmulatedOps>(m);
}
