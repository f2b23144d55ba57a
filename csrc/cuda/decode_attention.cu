// Launcher of csrc/kernels/decode_attention.cuh on a CUDA stream (argument checks in its dispatcher).
#include "cuda/launch.cuh"
#include "kernels/decode_attention.cuh"
#include "native.h"

namespace mmgen {

void decode_attention(const kernels::DecodeAttentionParams& p, kernels::DType dtype, bool vectorized,
                      std::uintptr_t stream) {
  kernels::dispatch_decode_attention(p, dtype, vectorized, CudaLaunch{to_stream(stream), "decode_attention"});
}

}  // namespace mmgen
