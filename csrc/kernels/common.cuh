// Shared device helpers of the framework-free kernels: element types, 16-byte vector loads and
// stores, warp and block reductions. Nothing here knows about torch or Python; the same sources
// also compile with the host compiler against tests/native/simt.h (MMGEN_SIMT_EMULATION), which
// runs them on the CPU in the tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mmgen {
namespace kernels {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC elements of T from p as floats: one 16-byte load when VEC * sizeof(T) == 16 (p aligned to
// 16 bytes), otherwise element by element.
template <class T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i]);
  }
}

// Rounds VEC floats to T and stores them at p (one 16-byte store when that is VEC * sizeof(T)).
template <class T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Copies VEC elements (one 16-byte move when that is their size).
template <class T, int VEC>
__device__ __forceinline__ void copy_elements(T* dst, const T* src) {
  if constexpr (VEC * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = src[i];
  }
}

// Sum over groups of WIDTH consecutive lanes (a power of two <= 32), by a xor butterfly:
// every lane of a group ends with the same value (each step adds the same two numbers in either
// order), and the order of the additions is fixed, so results are deterministic. Every lane of the
// warp must call it.
template <int WIDTH = kWarpSize, class T>
__device__ __forceinline__ T group_sum(T x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset, WIDTH);
  return x;
}

// Sum of x over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread:
// warp sums, then the warps' sums added in warp order by every thread. Deterministic; every
// thread must call it. `scratch` is the caller's __shared__ array of 32 values.
template <class T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  x = group_sum(x);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = x;
  __syncthreads();
  T total = 0;
  const int warps = blockDim.x / kWarpSize;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused at once
  return total;
}

}  // namespace kernels
}  // namespace mmgen
