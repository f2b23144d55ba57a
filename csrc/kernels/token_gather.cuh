// Image-token embedding gather: out[r] = table[tokens[r]] (+ bias), the input of the dVAE / VQGAN
// decoders. The OpenAI dVAE's first layer is a 1x1 convolution over one-hot codes, i.e. exactly
// this gather of its weight's rows plus its bias; VQGAN looks up its codebook.
//
// One warp per row, ROWS_PER_BLOCK rows per block; each lane moves 16-byte vectors. Rows land
// contiguously in [N, D]: for tokens [B, h, w] that is the channels-last [B, h, w, D] layout the
// decoders' convolutions take. With a bias the sum is rounded to T once (as table[tokens] + bias
// in T does). Token ids must be in [0, V): the Python wrapper checks them before the launch.
#pragma once

#include "common.cuh"
#include "params.h"

namespace mmgen {
namespace kernels {

constexpr int kGatherRowsPerBlock = 4;

template <class T, int VEC, bool BIAS>
__global__ void __launch_bounds__(kGatherRowsPerBlock * kWarpSize) token_gather_kernel(TokenGatherParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGatherRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.count) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = p.tokens[row];  // clamped: a bad id in a captured graph stays in bounds
  const T* src = static_cast<const T*>(p.table) + (token < 0 ? 0 : token >= p.vocab ? p.vocab - 1 : token) * p.table_stride;
  T* dst = static_cast<T*>(p.out) + row * p.dim;
  for (int d = lane * VEC; d < p.dim; d += kWarpSize * VEC) {
    if constexpr (BIAS) {
      float a[VEC], b[VEC];
      load_floats<T, VEC>(src + d, a);
      load_floats<T, VEC>(static_cast<const T*>(p.bias) + d, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += b[i];
      store_floats<T, VEC>(dst + d, a);
    } else {
      copy_elements<T, VEC>(dst + d, src + d);
    }
  }
}

// Host side: `vectorized` = table, bias and out 16-byte aligned, the table stride and D multiples
// of the vector.
template <class T, class Launch>
void launch_token_gather(const TokenGatherParams& p, bool vectorized, Launch&& launch) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((p.count + kGatherRowsPerBlock - 1) / kGatherRowsPerBlock));
  const dim3 block(kGatherRowsPerBlock * kWarpSize);
  const bool bias = p.bias != nullptr;
  if (vectorized && p.dim % V == 0) {
    bias ? launch(&token_gather_kernel<T, V, true>, grid, block, p)
         : launch(&token_gather_kernel<T, V, false>, grid, block, p);
  } else {
    bias ? launch(&token_gather_kernel<T, 1, true>, grid, block, p)
         : launch(&token_gather_kernel<T, 1, false>, grid, block, p);
  }
}

// Checks the arguments and launches for `dtype` (float16 or bfloat16).
template <class Launch>
void dispatch_token_gather(const TokenGatherParams& p, DType dtype, bool vectorized, Launch&& launch) {
  require(p.tokens && p.table && p.out && p.vocab > 0, "token_gather: null pointer or empty table");
  require(p.count >= 0 && p.count <= 0x7fffffffLL * kGatherRowsPerBlock && p.dim > 0,
          "token_gather: count or dim out of range");
  switch (dtype) {
    case DType::kFloat16: return launch_token_gather<__half>(p, vectorized, launch);
    case DType::kBFloat16: return launch_token_gather<__nv_bfloat16>(p, vectorized, launch);
    default: throw std::invalid_argument("token_gather: dtype must be float16 or bfloat16");
  }
}

}  // namespace kernels
}  // namespace mmgen
