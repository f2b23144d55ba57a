// Launcher of csrc/kernels/token_gather.cuh on a CUDA stream (argument checks in its dispatcher).
#include "cuda/launch.cuh"
#include "kernels/token_gather.cuh"
#include "native.h"

namespace mmgen {

void token_gather(const kernels::TokenGatherParams& p, kernels::DType dtype, bool vectorized,
                  std::uintptr_t stream) {
  kernels::dispatch_token_gather(p, dtype, vectorized, CudaLaunch{to_stream(stream), "token_gather"});
}

}  // namespace mmgen
