// Declarations shared by the native sources and the Python bindings. Nothing here depends on
// Python or torch: kernels take raw pointers, shapes and a stream (the CPU ones: a thread count),
// and the CUDA kernels' framework-free templates live in csrc/kernels/*.cuh (argument blocks in
// csrc/kernels/params.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "build_config.h"
#include "kernels/params.h"

namespace mmgen {

// How this library was compiled.
struct BuildInfo {
  std::string version;                  // package version, from pyproject.toml
  std::string compiler;                 // host C++ compiler, "<id> <version>"
  bool cuda;                            // CUDA sources compiled in
  std::vector<std::string> cuda_archs;  // CMake CUDA architectures, empty without CUDA
  std::string cuda_toolkit;             // CUDA toolkit version, empty without CUDA
};

BuildInfo build_info();  // csrc/cpu/build_info.cpp

// ---- CPU kernels (csrc/cpu/gemv.cpp) -----------------------------------------------------------
// Few-row products whose weight is stored in fewer bytes than float32 and widened in registers:
//   y[r, n] = sum_k x[r, k] W[n, k] (+ bias[n]),  r < rows <= kGemvMaxRows,
// W int8 times float32 scales (per output channel, or per group of `group_size` inputs with a short
// last group) or bfloat16 (widened exactly to float32); x, y and the sums float32. At one row the
// product streams W once: its speed is the memory bandwidth over W's bytes.

constexpr int kGemvMaxRows = 16;

// Instruction sets of the CPU kernels, widest last. kAvx2 needs AVX2 + FMA; kAvx512 needs AVX-512
// F, BW and VL. Vector code is compiled for x86-64 with GCC or Clang (function-level targets, chosen
// at run time), so one build runs on every x86-64 CPU; elsewhere only kScalar exists.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
std::vector<CpuIsa> cpu_isas();  // what this build compiled and this CPU runs, widest last
bool cpu_openmp();               // threads through OpenMP (else one thread)

enum class GemvWeight : int { kInt8 = 0, kBfloat16 = 1 };

struct GemvParams {
  const float* x;      // [rows, k], row stride ldx (elements), unit column stride
  int64_t ldx;
  const void* w;       // [n, k] row-major contiguous: int8, or bfloat16 bits (uint16)
  const float* scale;  // int8: [n, ceil(k / group_size)] contiguous; unused for bfloat16
  int64_t group_size;  // int8: inputs per scale (>= k: one scale per output channel, scale [n])
  const float* bias;   // [n] or null
  float* y;            // [rows, n], row stride ldy
  int64_t ldy;
  int64_t rows, n, k;
};

// Runs the product on up to `threads` threads (contiguous ranges of outputs), with `isa` (one of
// cpu_isas()). Bad arguments throw std::invalid_argument before anything is read.
void gemv(const GemvParams& p, GemvWeight weight, int threads, CpuIsa isa);

// ---- CPU: one decode step of a small GPT-2-style decoder (csrc/cpu/decoder_step.cpp) ----------
// Pre-LayerNorm blocks: h += out(attn(ln1(h))); [h += cross_out(cross(lnx(h), encoder K/V));]
// h += fc2(act(fc1(ln2(h)))); logits = ln_f(h) head^T. float32 throughout, on the calling thread.

// A weight W [n, k] read in place: W(i, j) = w[i * sn + j * sk], with sk == 1 (row-major) or
// sn == 1 (column-major, W^T contiguous).
struct StepMatrix {
  const float* w;
  int64_t n, k, sn, sk;
};

enum class StepActivation : int { kGeluErf = 0, kGeluTanh = 1, kGeluSigmoid = 2 };  // ops.bias_gelu's forms

struct DecoderStepLayer {
  const float *ln1_w, *ln1_b;
  StepMatrix qkv;  // [3 dim, dim]: q, k, v rows
  const float* qkv_b;
  StepMatrix out;
  const float* out_b;
  const float *lnx_w, *lnx_b;  // cross-attention (cross_q.w null: none; then in no layer)
  StepMatrix cross_q;
  const float* cross_q_b;
  StepMatrix cross_out;
  const float* cross_out_b;
  const float *ln2_w, *ln2_b;
  StepMatrix fc1, fc2;
  const float *fc1_b, *fc2_b;
  float scale;  // attention logit scale (self and cross)
};

struct DecoderStepModel {
  int64_t dim, heads, head_dim, hidden;
  float eps;
  StepActivation activation;
  StepMatrix wte, wpe, head;  // token and position embeddings [V, dim], [P, dim]; head [V', dim]
  const float *lnf_w, *lnf_b;
  std::vector<DecoderStepLayer> layers;
};

// One token per row. Caches: k/v [layers, rows, heads, slots, head_dim] with strides in elements
// (head_dim contiguous); the cross cache [layers, cross_rows, heads, cross_len, head_dim], row r
// reading cross row r / (rows / cross_rows). Row r's token goes to slot positions[r] (< span) and
// attends to slots 0..positions[r]; logits [rows, head.n] with row stride ld_logits.
struct DecoderStepIO {
  const int64_t *tokens, *positions;
  int64_t rows;
  float *k, *v;
  int64_t k_strides[4], v_strides[4];
  int64_t slots, span;
  const float *cross_k, *cross_v;
  int64_t ck_strides[4], cv_strides[4];
  int64_t cross_rows, cross_len;
  const int64_t* cross_lengths;
  float* logits;
  int64_t ld_logits;
};

void check_decoder_step(const DecoderStepModel& m);  // shapes and strides; std::invalid_argument
// Ids, positions and lengths are checked before anything is written (std::invalid_argument).
void decoder_step(const DecoderStepModel& m, const DecoderStepIO& io);

// ---- CPU sampling (csrc/cpu/sampling.cpp) ------------------------------------------------------
// out[j] = mmgen_engine.ops.random.uniform_at(seeds[j], offsets[j], rows[j], cols[j]), bitwise.
void philox_uniform(const int64_t* seeds, const int64_t* offsets, const int64_t* rows, const int64_t* cols,
                    int64_t count, float* out);

// Next tokens from Gumbel noise drawn ahead:
// mmgen_engine.ops.sampling's filter (temperature, top-k, top-p) and Gumbel-max pick with the noise
// g = log(-log(u)) read from drawn[b, offset_b, i]: token_b = argmax_i (l_i - g_i) where do_sample[b],
// else argmax_i z_i. Logits: the first n columns of [rows, ld_logits] float32.
struct SampleDrawnParams {
  const float* logits;
  int64_t ld_logits, rows, n;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const bool* do_sample;
  const float* drawn;  // [rows, offsets, n] with these strides (elements), unit stride along n
  int64_t drawn_row_stride, drawn_offset_stride, offsets;
  const int64_t* offset;  // [offset_len]: 1 (every row) or rows
  int64_t offset_len;
  int64_t* out;  // [rows]
};
void sample_drawn(const SampleDrawnParams& p);  // std::invalid_argument before anything is written

#if MMGEN_WITH_CUDA
// csrc/cuda/device.cu
int cuda_runtime_version();  // CUDART_VERSION style: 1000 * major + 10 * minor
int cuda_device_count();     // 0 when there is no driver or no device; throws on other errors

// Kernel launchers, csrc/cuda/*.cu: enqueue on `stream` (a cudaStream_t) and return; launch
// errors throw std::runtime_error. `vectorized`: the caller checked that every pointer is 16-byte
// aligned and every row stride a multiple of 16 bytes.
void decode_attention(const kernels::DecodeAttentionParams& p, kernels::DType dtype, bool vectorized,
                      std::uintptr_t stream);
void layer_norm(const kernels::LayerNormParams& p, kernels::DType dtype, bool weight_fp32, bool vectorized,
                std::uintptr_t stream);
void token_gather(const kernels::TokenGatherParams& p, kernels::DType dtype, bool vectorized,
                  std::uintptr_t stream);
void sample(const kernels::SampleParams& p, kernels::DType dtype, std::uintptr_t stream);
#endif

}  // namespace mmgen
