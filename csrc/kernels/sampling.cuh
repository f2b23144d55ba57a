// Fused sampling: guidance combine, temperature, top-k, top-p and a Gumbel-max draw, one block per
// row. Computes mmgen_engine.ops.sample (the spec is mmgen_engine/ops/sampling.py) with the same
// decisions as the Triton kernel (kernels/sampling.py) and the same random numbers.
//
// Per row b, every value in fp32 with explicitly rounded operations (no FMA contraction), as torch
// computes them:
//   z = logits[b] (guided: uncond * (1 - g) + cond * g), l = z * inv_t
//   1. max pass: max z and its first index - the token of a greedy row, which stops here.
//   2. top-k (0 < k < n): radix search for the k-th largest key of l (counts, exact).
//   3. top-p (p < 1): s = sum of exp(l - m) over the top-k survivors (m = max l = max z * inv_t),
//      then a radix search with weights exp(l - m) / s for the largest key whose mass at or above
//      reaches p: a token is kept iff the mass strictly above it is < p.
//   4. Gumbel pass: argmax over kept tokens of l - log(-log(u)), first index on ties.
// Keys are order-preserving uint32 images of fp32 (-0.0 keyed as +0.0). A radix search finds the
// largest key T with sum over {key >= T} of w >= target, 4 bits per pass (16 candidate thresholds
// compared at once, 8 passes), without sorting. Every pass re-reads the row (from L2 after the
// first); there is no workspace.
//
// Sums (the counts, s and the top-p masses) are per-thread sums over a fixed strided slice of the
// row, then fixed-order warp and block reductions: deterministic for a given n. Like the Triton
// kernel's, they are fp32 sums in another order than the reference's, so a token whose mass above
// is within rounding of top_p can be kept or dropped differently; everything else is exact.
//
// Random numbers: u[b, i] from Philox4x32-10 with key (seed_b & 0xffffffff, seed_b >> 32) and
// counter (i, b, offset & 0xffffffff, offset >> 32), first word x0, u = ((x0 >> 9) + 0.5) * 2^-23
// (mmgen_engine/ops/random.py; tl.philox computes the same), so a seed gives the same tokens as the
// Triton sampler. The offset is read on the device (a CUDA graph replays with a new one).
#pragma once

#include <cmath>

#include "common.cuh"
#include "params.h"

namespace mmgen {
namespace kernels {

constexpr int kRadixSteps = 8;  // 4 bits of the 32-bit key each

__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

// Philox4x32-10 (Salmon et al. 2011), the first output word.
__device__ __forceinline__ uint32_t philox_x0(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Reduces 16 per-lane values over the warp by halving exchanges (8 + 4 + 2 + 1 + 1 shuffles
// instead of 16 * 5): afterwards lanes 2j and 2j + 1 hold the warp's total of digit
// ((lane & 16) >> 1) | ((lane & 8) >> 1) | ((lane & 4) >> 1) | ((lane & 2) >> 1), returned.
// Deterministic (a fixed order of additions per digit).
template <class V>
__device__ __forceinline__ V warp_digit_sums(V (&v)[16], int& digit) {
  const int lane = threadIdx.x % kWarpSize;
  digit = 0;
#pragma unroll
  for (int half = 8, offset = 16; half >= 1; half /= 2, offset /= 2) {
    const bool upper = lane & offset;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const V send = upper ? v[j] : v[j + half];
      const V keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(kFullMask, send, offset);
    }
    digit += upper ? half : 0;
  }
  return v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
}

template <class T>
struct SampleRow {
  const T* uncond;
  const T* cond;  // null without guidance
  float g, inv_t;

  __device__ __forceinline__ float z(int i) const {
    const float u = to_float(uncond[i]);
    if (cond == nullptr) return u;
    return __fadd_rn(__fmul_rn(u, __fsub_rn(1.f, g)), __fmul_rn(to_float(cond[i]), g));
  }
  __device__ __forceinline__ float l(int i) const { return __fmul_rn(z(i), inv_t); }
};

// The largest key T with sum over the row of w(i) for key(l_i) >= T reaching `target`.
// `weight(i, key)` gives w for column i; V is int (counts) or float (masses).
template <class V, class Row, class Weight>
__device__ uint32_t radix_search(const Row& row, int n, V target, Weight weight, V* scratch /* [32][16] */,
                                 uint32_t* shared_prefix) {
  const int warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  uint32_t prefix = 0;
  for (int step = 0; step < kRadixSteps; ++step) {
    const int shift = 28 - 4 * step;
    V sums[16];
#pragma unroll
    for (int d = 0; d < 16; ++d) sums[d] = V(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float l = row.l(i);
      const uint32_t key = order_key(l);
      const V w = weight(i, l, key);
#pragma unroll
      for (int d = 0; d < 16; ++d) sums[d] += key >= (prefix | (static_cast<uint32_t>(d) << shift)) ? w : V(0);
    }
    int digit;
    const V total = warp_digit_sums(sums, digit);
    if (threadIdx.x % 2 == 0) scratch[warp * 16 + digit] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      int best = 0;  // the largest digit whose candidate reaches the target (0 always does)
      for (int d = 1; d < 16; ++d) {
        V row_total = V(0);
        for (int w = 0; w < warps; ++w) row_total += scratch[w * 16 + d];
        if (row_total >= target) best = d;
      }
      *shared_prefix = prefix | (static_cast<uint32_t>(best) << shift);
    }
    __syncthreads();
    prefix = *shared_prefix;
    __syncthreads();  // shared_prefix and scratch are rewritten by the next step
  }
  return prefix;
}

// (value, index) of the max, first index on ties, over the block; returned to every thread.
__device__ __forceinline__ void block_argmax(float& value, int& index, float* values, int* indices) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(kFullMask, value, offset);
    const int i = __shfl_xor_sync(kFullMask, index, offset);
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    values[warp] = value;
    indices[warp] = index;
  }
  __syncthreads();
  value = values[0];
  index = indices[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
    if (values[w] > value || (values[w] == value && indices[w] < index)) {
      value = values[w];
      index = indices[w];
    }
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(1024) sample_kernel(SampleParams p) {
  __shared__ float values[kWarpSize];
  __shared__ int indices[kWarpSize];
  __shared__ int counts[kWarpSize * 16];
  __shared__ float masses[kWarpSize * 16];
  __shared__ uint32_t prefix;

  const int b = blockIdx.x;
  const int n = p.n;
  const T* logits = static_cast<const T*>(p.logits);
  SampleRow<T> row{logits + b * p.stride, nullptr, 0.f, 1.f};
  if (p.guidance != nullptr) {
    row.cond = logits + (b + p.batch) * p.stride;
    row.g = p.guidance[b];
  }

  // 1. max z and its first index (the greedy token); all -inf: index 0, as argmax gives
  float best = -INFINITY;
  int arg = n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float z = row.z(i);
    if (z > best || (z == best && i < arg)) {
      best = z;
      arg = i;
    }
  }
  block_argmax(best, arg, values, indices);
  if (p.greedy || !p.do_sample[b]) {
    if (threadIdx.x == 0) p.out[b] = arg;
    return;
  }
  row.inv_t = p.inv_t[b];

  // 2. top-k threshold (0 keeps everything)
  const int64_t k = p.top_k[b];
  uint32_t floor = 0;
  if (k > 0 && k < n) {
    floor = radix_search<int>(row, n, static_cast<int>(k), [](int, float, uint32_t) { return 1; }, counts, &prefix);
  }

  // 3. top-p threshold over the softmax of the top-k survivors
  const float top_p = p.top_p[b];
  if (top_p < 1.f) {
    const float m = __fmul_rn(best, row.inv_t);
    float e = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float l = row.l(i);
      if (order_key(l) >= floor) e += expf(__fsub_rn(l, m));
    }
    const float s = block_sum(e, values);
    const uint32_t kept = floor;
    const uint32_t top_p_floor = radix_search<float>(
        row, n, top_p,
        [&](int, float l, uint32_t key) { return key >= kept ? __fdiv_rn(expf(__fsub_rn(l, m)), s) : 0.f; },
        masses, &prefix);
    if (top_p_floor > floor) floor = top_p_floor;
  }

  // 4. Gumbel-max over the kept tokens
  const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
  const uint64_t offset = static_cast<uint64_t>(*p.offset);
  const uint32_t off_lo = static_cast<uint32_t>(offset), off_hi = static_cast<uint32_t>(offset >> 32);
  best = -INFINITY;
  arg = n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float l = row.l(i);
    if (order_key(l) < floor) continue;
    const uint32_t x0 = philox_x0(seed, static_cast<uint32_t>(i), static_cast<uint32_t>(b), off_lo, off_hi);
    const float u = (static_cast<float>(x0 >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
    const float v = __fsub_rn(l, logf(-logf(u)));
    if (v > best || (v == best && i < arg)) {
      best = v;
      arg = i;
    }
  }
  block_argmax(best, arg, values, indices);
  if (threadIdx.x == 0) p.out[b] = arg < n ? arg : 0;
}

// Host side: one block per row, 128 to 1024 threads (about 16 columns per thread).
template <class T, class Launch>
void launch_sample(const SampleParams& p, Launch&& launch) {
  int threads = 128;
  while (threads < 1024 && threads * 16 < p.n) threads *= 2;
  launch(&sample_kernel<T>, dim3(p.batch), dim3(threads), p);
}

// Checks the arguments and launches for the logits' `dtype` (float32, float16 or bfloat16).
template <class Launch>
void dispatch_sample(const SampleParams& p, DType dtype, Launch&& launch) {
  require(p.logits && p.out && p.inv_t && p.top_k && p.top_p && p.do_sample && p.seeds && p.offset,
          "sample: null pointer");
  require(p.batch > 0 && p.n > 0 && p.stride >= p.n, "sample: batch, vocabulary or row stride out of range");
  switch (dtype) {
    case DType::kFloat32: return launch_sample<float>(p, launch);
    case DType::kFloat16: return launch_sample<__half>(p, launch);
    case DType::kBFloat16: return launch_sample<__nv_bfloat16>(p, launch);
  }
  throw std::invalid_argument("sample: unknown dtype");
}

}  // namespace kernels
}  // namespace mmgen
