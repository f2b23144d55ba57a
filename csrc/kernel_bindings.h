// Python bindings of the kernel launchers, shared by the production module (bindings.cpp, Ops =
// the CUDA launchers of csrc/cuda) and the tests' CPU-emulated module (tests/native, Ops = the
// same dispatchers launched by the emulator). Arguments are device pointers (Python ints), sizes,
// strides in elements and a stream handle; mmgen_engine/ops/cuda_ops.py checks shapes, dtypes,
// contiguity and value ranges before calling.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "kernels/params.h"

namespace mmgen {

template <class T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <class Ops>
void bind_kernels(pybind11::module_& m) {
  namespace py = pybind11;
  using kernels::DType;
  using Strides2 = std::array<int64_t, 2>;
  using Strides3 = std::array<int64_t, 3>;
  m.attr("DECODE_CHUNK") = kernels::kDecodeChunk;
  m.attr("DECODE_MAX_HEAD_DIM") = kernels::kDecodeMaxHeadDim;
  m.attr("NORM_MAX_DIM") = kernels::kNormMaxDim;

  m.def(
      "decode_attention",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t new_k, std::uintptr_t new_v,
         std::uintptr_t lengths, std::uintptr_t out, std::uintptr_t partial, std::uintptr_t ml, int dtype,
         int batch, int group, int heads, int slots, int head_dim, int splits, Strides2 q_strides,
         Strides3 k_strides, Strides3 v_strides, Strides2 new_strides, float scale, int kv_heads,
         std::uintptr_t cos, std::uintptr_t sin, bool vectorized, std::uintptr_t stream) {
        const kernels::DecodeAttentionParams p{
            ptr(q), ptr(k), ptr(v), ptr(new_k), ptr(new_v), ptr<const int64_t>(lengths), ptr(out),
            ptr<float>(partial), ptr<float>(ml), batch, heads, slots, head_dim, group, kernels::kDecodeChunk, splits,
            q_strides[0], q_strides[1], k_strides[0], k_strides[1], k_strides[2], v_strides[0], v_strides[1],
            v_strides[2], new_strides[0], new_strides[1], scale, kv_heads, ptr<const float>(cos),
            ptr<const float>(sin)};
        Ops::decode_attention(p, static_cast<DType>(dtype), vectorized, stream);
      },
      "Decode attention over a KV cache (csrc/kernels/decode_attention.cuh).", py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("new_k"), py::arg("new_v"), py::arg("lengths"), py::arg("out"), py::arg("partial"),
      py::arg("ml"), py::arg("dtype"), py::arg("batch"), py::arg("group"), py::arg("heads"), py::arg("slots"),
      py::arg("head_dim"), py::arg("splits"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("new_strides"), py::arg("scale"), py::arg("kv_heads"), py::arg("cos"), py::arg("sin"),
      py::arg("vectorized"), py::arg("stream"));

  m.def(
      "layer_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t out, std::uintptr_t h, std::uintptr_t weight,
         std::uintptr_t bias, int dtype, bool weight_fp32, int64_t rows, int dim, float eps, bool vectorized,
         std::uintptr_t stream) {
        const kernels::LayerNormParams p{ptr(x), ptr(residual), ptr(out), ptr(h), ptr(weight), ptr(bias),
                                         rows, dim, eps};
        Ops::layer_norm(p, static_cast<DType>(dtype), weight_fp32, vectorized, stream);
      },
      "(Residual add +) LayerNorm over rows (csrc/kernels/layer_norm.cuh).", py::arg("x"), py::arg("residual"),
      py::arg("out"), py::arg("h"), py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("weight_fp32"),
      py::arg("rows"), py::arg("dim"), py::arg("eps"), py::arg("vectorized"), py::arg("stream"));

  m.def(
      "token_gather",
      [](std::uintptr_t tokens, std::uintptr_t table, std::uintptr_t bias, std::uintptr_t out, int dtype,
         int64_t count, int64_t vocab, int64_t table_stride, int dim, bool vectorized, std::uintptr_t stream) {
        const kernels::TokenGatherParams p{ptr<const int64_t>(tokens), ptr(table), ptr(bias), ptr(out),
                                           count, vocab, table_stride, dim};
        Ops::token_gather(p, static_cast<DType>(dtype), vectorized, stream);
      },
      "Embedding-row gather for image tokens (csrc/kernels/token_gather.cuh).", py::arg("tokens"),
      py::arg("table"), py::arg("bias"), py::arg("out"), py::arg("dtype"), py::arg("count"), py::arg("vocab"),
      py::arg("table_stride"), py::arg("dim"), py::arg("vectorized"), py::arg("stream"));

  m.def(
      "sample",
      [](std::uintptr_t logits, int64_t stride, std::uintptr_t guidance, std::uintptr_t inv_t,
         std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t do_sample, std::uintptr_t seeds,
         std::uintptr_t offset, int offset_stride, std::uintptr_t rows, std::uintptr_t out, int dtype, int batch,
         int n, bool greedy, std::uintptr_t stream) {
        const kernels::SampleParams p{ptr(logits), stride, ptr<const float>(guidance), ptr<const float>(inv_t),
                                      ptr<const int64_t>(top_k), ptr<const float>(top_p),
                                      ptr<const bool>(do_sample), ptr<const int64_t>(seeds),
                                      ptr<const int64_t>(offset), ptr<const int64_t>(rows), ptr<int64_t>(out),
                                      batch, n, offset_stride, greedy};
        Ops::sample(p, static_cast<DType>(dtype), stream);
      },
      "Fused top-k / top-p / Gumbel-max sampling (csrc/kernels/sampling.cuh).", py::arg("logits"),
      py::arg("stride"), py::arg("guidance"), py::arg("inv_t"), py::arg("top_k"), py::arg("top_p"),
      py::arg("do_sample"), py::arg("seeds"), py::arg("offset"), py::arg("offset_stride"), py::arg("rows"),
      py::arg("out"), py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("greedy"), py::arg("stream"));
}

}  // namespace mmgen
