// LayerNorm and fused residual add + LayerNorm over the last dim of [rows, D].
//
//   layer_norm:      out = (x - mean) / sqrt(var + eps) * weight + bias
//   add_layer_norm:  h = x + residual (rounded to T, as the reference adds in the input dtype),
//                    out = layer_norm(h); both written
//
// One block per row, the smallest power-of-two block (32 to 1024 threads) whose threads hold the
// row in registers: up to CHUNKS = kNormMaxDim / (1024 * VEC) vectors of VEC elements each (vector j
// = c * blockDim + thread; 16 values at most), so the row is read once and written once
// (add_layer_norm: x and residual read, h and out written: 4 * D * sizeof(T) bytes per row). Statistics in fp32,
// two-pass (mean, then the mean of squared deviations) over the registers, block sums in a fixed
// order. weight and bias are W: fp32 or T.
#pragma once

#include <cmath>

#include "common.cuh"
#include "params.h"

namespace mmgen {
namespace kernels {

template <class T, class W, int VEC, bool RESIDUAL>
__global__ void __launch_bounds__(1024) layer_norm_kernel(LayerNormParams p) {
  __shared__ float scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const int D = p.dim;
  const int64_t base = row * D;
  const T* x = static_cast<const T*>(p.x) + base;
  constexpr int CHUNKS = kNormMaxDim / (1024 * VEC);
  float v[CHUNKS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int d = (c * blockDim.x + threadIdx.x) * VEC;
    if (d < D) {
      load_floats<T, VEC>(x + d, v[c]);
      if constexpr (RESIDUAL) {
        float r[VEC];
        load_floats<T, VEC>(static_cast<const T*>(p.residual) + base + d, r);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[c][i] = to_float(from_float<T>(v[c][i] + r[i]));
        store_floats<T, VEC>(static_cast<T*>(p.h) + base + d, v[c]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[c][i];
    }
  }
  const float mean = block_sum(sum, scratch) / D;
  float squares = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int d = (c * blockDim.x + threadIdx.x) * VEC;
    if (d < D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        v[c][i] -= mean;
        squares += v[c][i] * v[c][i];
      }
    }
  }
  const float rstd = 1.f / sqrtf(block_sum(squares, scratch) / D + p.eps);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int d = (c * blockDim.x + threadIdx.x) * VEC;
    if (d < D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[c][i] = v[c][i] * rstd * to_float(weight[d + i]) + to_float(bias[d + i]);
      store_floats<T, VEC>(static_cast<T*>(p.out) + base + d, v[c]);
    }
  }
}

// Host side: `vectorized` = x, residual, out and h 16-byte aligned and D a multiple of the vector.
template <class T, class W, class Launch>
void launch_layer_norm(const LayerNormParams& p, bool vectorized, Launch&& launch) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = vectorized && p.dim % V == 0;
  const int vectors = vec ? p.dim / V : p.dim;
  int threads = kWarpSize;
  const int chunks = kNormMaxDim / (1024 * (vec ? V : 1));
  while (threads * chunks < vectors) threads *= 2;
  const dim3 grid(static_cast<unsigned>(p.rows)), block(threads);
  const bool res = p.residual != nullptr;
  if (vec) {
    res ? launch(&layer_norm_kernel<T, W, V, true>, grid, block, p)
        : launch(&layer_norm_kernel<T, W, V, false>, grid, block, p);
  } else {
    res ? launch(&layer_norm_kernel<T, W, 1, true>, grid, block, p)
        : launch(&layer_norm_kernel<T, W, 1, false>, grid, block, p);
  }
}

template <class T, class Launch>
void launch_layer_norm_for(const LayerNormParams& p, bool weight_fp32, bool vectorized, Launch&& launch) {
  weight_fp32 ? launch_layer_norm<T, float>(p, vectorized, launch) : launch_layer_norm<T, T>(p, vectorized, launch);
}

// Checks the arguments and launches for `dtype` (float16 or bfloat16); weight and bias are fp32
// (`weight_fp32`) or `dtype`.
template <class Launch>
void dispatch_layer_norm(const LayerNormParams& p, DType dtype, bool weight_fp32, bool vectorized, Launch&& launch) {
  require(p.x && p.out && p.weight && p.bias, "layer_norm: null pointer");
  require(p.residual == nullptr || p.h != nullptr, "layer_norm: a residual needs the h output");
  require(p.rows >= 0 && p.rows <= 0x7fffffff && p.dim > 0 && p.dim <= kNormMaxDim,
          "layer_norm: rows or dim out of range");
  switch (dtype) {
    case DType::kFloat16: return launch_layer_norm_for<__half>(p, weight_fp32, vectorized, launch);
    case DType::kBFloat16: return launch_layer_norm_for<__nv_bfloat16>(p, weight_fp32, vectorized, launch);
    default: throw std::invalid_argument("layer_norm: dtype must be float16 or bfloat16");
  }
}

}  // namespace kernels
}  // namespace mmgen
