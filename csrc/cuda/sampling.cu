// Launcher of csrc/kernels/sampling.cuh on a CUDA stream (argument checks in its dispatcher).
#include "cuda/launch.cuh"
#include "kernels/sampling.cuh"
#include "native.h"

namespace mmgen {

void sample(const kernels::SampleParams& p, kernels::DType dtype, std::uintptr_t stream) {
  kernels::dispatch_sample(p, dtype, CudaLaunch{to_stream(stream), "sample"});
}

}  // namespace mmgen
