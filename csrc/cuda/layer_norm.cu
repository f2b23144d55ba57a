// Launcher of csrc/kernels/layer_norm.cuh on a CUDA stream (argument checks in its dispatcher).
#include "cuda/launch.cuh"
#include "kernels/layer_norm.cuh"
#include "native.h"

namespace mmgen {

void layer_norm(const kernels::LayerNormParams& p, kernels::DType dtype, bool weight_fp32, bool vectorized,
                std::uintptr_t stream) {
  kernels::dispatch_layer_norm(p, dtype, weight_fp32, vectorized, CudaLaunch{to_stream(stream), "layer_norm"});
}

}  // namespace mmgen
