// Python bindings of the native library: the module mmgen_engine._C. Only argument conversion
// lives here; mmgen_engine/_native.py is its Python face.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "native.h"
#if MMGEN_WITH_CUDA
#include "kernel_bindings.h"
#endif

namespace py = pybind11;

#if MMGEN_WITH_CUDA
namespace {

// The CUDA launchers of csrc/cuda, as bind_kernels wants them.
struct CudaOps {
  static constexpr auto decode_attention = &mmgen::decode_attention;
  static constexpr auto layer_norm = &mmgen::layer_norm;
  static constexpr auto token_gather = &mmgen::token_gather;
  static constexpr auto sample = &mmgen::sample;
};

}  // namespace
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmgen_engine native library (C++ CPU and CUDA kernels, no libtorch)";

  const mmgen::BuildInfo info = mmgen::build_info();
  m.attr("__version__") = info.version;
  m.attr("compiler") = info.compiler;
  m.attr("cuda") = info.cuda;
  m.attr("cuda_archs") = py::tuple(py::cast(info.cuda_archs));
  m.attr("cuda_toolkit") = info.cuda ? py::object(py::str(info.cuda_toolkit)) : py::none();

  py::list isas;
  for (mmgen::CpuIsa isa : mmgen::cpu_isas()) isas.append(static_cast<int>(isa));
  m.attr("cpu_isas") = py::tuple(isas);  // CpuIsa codes this build and CPU run, widest last
  m.attr("cpu_openmp") = mmgen::cpu_openmp();
  m.attr("GEMV_MAX_ROWS") = mmgen::kGemvMaxRows;
  m.def(
      "gemv",
      [](std::uintptr_t x, int64_t ldx, std::uintptr_t w, int weight, std::uintptr_t scale, int64_t group_size,
         std::uintptr_t bias, std::uintptr_t y, int64_t ldy, int64_t rows, int64_t n, int64_t k, int threads,
         int isa) {
        const mmgen::GemvParams p{reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const void*>(w),
                                  reinterpret_cast<const float*>(scale), group_size,
                                  reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), ldy,
                                  rows, n, k};
        mmgen::gemv(p, static_cast<mmgen::GemvWeight>(weight), threads, static_cast<mmgen::CpuIsa>(isa));
      },
      "Few-row product y = x W^T (+ bias) with an int8 (weight=0) or bfloat16 (weight=1) weight widened "
      "in registers (csrc/cpu/gemv.cpp); CPU pointers as ints.",
      py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("weight"), py::arg("scale"), py::arg("group_size"),
      py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("rows"), py::arg("n"), py::arg("k"),
      py::arg("threads"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());

  // A small decoder's whole decode step (csrc/cpu/decoder_step.cpp). Matrices are (pointer, n, k,
  // stride n, stride k); the model's weights stay owned by the caller, who keeps them alive.
  using Mat = std::array<int64_t, 5>;
  using Strides4 = std::array<int64_t, 4>;
  auto mat = [](const Mat& a) {
    return mmgen::StepMatrix{reinterpret_cast<const float*>(a[0]), a[1], a[2], a[3], a[4]};
  };
  auto vec = [](const py::dict& d, const char* key) {
    return d.contains(key) ? reinterpret_cast<const float*>(d[key].cast<std::uintptr_t>()) : nullptr;
  };
  py::class_<mmgen::DecoderStepModel>(m, "DecoderStep")
      .def(py::init([mat, vec](int64_t dim, int64_t heads, int64_t hidden, float eps, int activation,
                               const Mat& wte, const Mat& wpe, const Mat& head, std::uintptr_t lnf_w,
                               std::uintptr_t lnf_b, const std::vector<py::dict>& layers) {
             if (activation < 0 || activation > 2) throw std::invalid_argument("decoder step: activation must be 0..2");
             mmgen::DecoderStepModel model{dim, heads, heads > 0 ? dim / heads : 0, hidden, eps,
                                           static_cast<mmgen::StepActivation>(activation), mat(wte), mat(wpe),
                                           mat(head), reinterpret_cast<const float*>(lnf_w),
                                           reinterpret_cast<const float*>(lnf_b), {}};
             const Mat none{0, 0, 0, 0, 0};
             for (const py::dict& d : layers) {
               auto m_or_none = [&](const char* key) { return d.contains(key) ? mat(d[key].cast<Mat>()) : mat(none); };
               model.layers.push_back({vec(d, "ln1_w"), vec(d, "ln1_b"), m_or_none("qkv"), vec(d, "qkv_b"),
                                       m_or_none("out"), vec(d, "out_b"), vec(d, "lnx_w"), vec(d, "lnx_b"),
                                       m_or_none("cross_q"), vec(d, "cross_q_b"), m_or_none("cross_out"),
                                       vec(d, "cross_out_b"), vec(d, "ln2_w"), vec(d, "ln2_b"), m_or_none("fc1"),
                                       m_or_none("fc2"), vec(d, "fc1_b"), vec(d, "fc2_b"),
                                       d["scale"].cast<float>()});
             }
             mmgen::check_decoder_step(model);
             return model;
           }),
           "A small GPT-2-style decoder's weights (pointers, not copies). Layers: dicts of ln1_w, ln1_b, qkv, "
           "qkv_b, out, out_b, [lnx_w, lnx_b, cross_q, cross_q_b, cross_out, cross_out_b], ln2_w, ln2_b, fc1, "
           "fc1_b, fc2, fc2_b (vectors: pointers; matrices: (pointer, n, k, stride n, stride k)), scale.",
           py::arg("dim"), py::arg("heads"), py::arg("hidden"), py::arg("eps"), py::arg("activation"),
           py::arg("wte"), py::arg("wpe"), py::arg("head"), py::arg("lnf_w"), py::arg("lnf_b"), py::arg("layers"))
      .def(
          "__call__",
          [](const mmgen::DecoderStepModel& model, std::uintptr_t tokens, std::uintptr_t positions, int64_t rows,
             std::uintptr_t k, std::uintptr_t v, const Strides4& k_strides, const Strides4& v_strides, int64_t slots,
             int64_t span, std::uintptr_t cross_k, std::uintptr_t cross_v, const Strides4& ck_strides,
             const Strides4& cv_strides, int64_t cross_rows, int64_t cross_len, std::uintptr_t cross_lengths,
             std::uintptr_t logits, int64_t ld_logits) {
            mmgen::DecoderStepIO io{reinterpret_cast<const int64_t*>(tokens), reinterpret_cast<const int64_t*>(positions),
                                    rows, reinterpret_cast<float*>(k), reinterpret_cast<float*>(v),
                                    {k_strides[0], k_strides[1], k_strides[2], k_strides[3]},
                                    {v_strides[0], v_strides[1], v_strides[2], v_strides[3]}, slots, span,
                                    reinterpret_cast<const float*>(cross_k), reinterpret_cast<const float*>(cross_v),
                                    {ck_strides[0], ck_strides[1], ck_strides[2], ck_strides[3]},
                                    {cv_strides[0], cv_strides[1], cv_strides[2], cv_strides[3]}, cross_rows,
                                    cross_len, reinterpret_cast<const int64_t*>(cross_lengths),
                                    reinterpret_cast<float*>(logits), ld_logits};
            mmgen::decoder_step(model, io);
          },
          "One decode step: CPU pointers as ints, strides in elements (see csrc/native.h, DecoderStepIO).",
          py::arg("tokens"), py::arg("positions"), py::arg("rows"), py::arg("k"), py::arg("v"), py::arg("k_strides"),
          py::arg("v_strides"), py::arg("slots"), py::arg("span"), py::arg("cross_k"), py::arg("cross_v"),
          py::arg("ck_strides"), py::arg("cv_strides"), py::arg("cross_rows"), py::arg("cross_len"),
          py::arg("cross_lengths"), py::arg("logits"), py::arg("ld_logits"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "philox_uniform",
      [](std::uintptr_t seeds, std::uintptr_t offsets, std::uintptr_t rows, std::uintptr_t cols, int64_t count,
         std::uintptr_t out) {
        mmgen::philox_uniform(reinterpret_cast<const int64_t*>(seeds), reinterpret_cast<const int64_t*>(offsets),
                              reinterpret_cast<const int64_t*>(rows), reinterpret_cast<const int64_t*>(cols), count,
                              reinterpret_cast<float*>(out));
      },
      "Philox uniforms of mmgen_engine.ops.random.uniform_at for int64 arrays of `count` (csrc/cpu/sampling.cpp).",
      py::arg("seeds"), py::arg("offsets"), py::arg("rows"), py::arg("cols"), py::arg("count"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "sample_drawn",
      [](std::uintptr_t logits, int64_t ld_logits, int64_t rows, int64_t n, std::uintptr_t temperature,
         std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t do_sample, std::uintptr_t drawn,
         int64_t drawn_row_stride, int64_t drawn_offset_stride, int64_t offsets, std::uintptr_t offset,
         int64_t offset_len, std::uintptr_t out) {
        const mmgen::SampleDrawnParams p{reinterpret_cast<const float*>(logits), ld_logits, rows, n,
                                         reinterpret_cast<const float*>(temperature),
                                         reinterpret_cast<const int64_t*>(top_k),
                                         reinterpret_cast<const float*>(top_p), reinterpret_cast<const bool*>(do_sample),
                                         reinterpret_cast<const float*>(drawn), drawn_row_stride, drawn_offset_stride,
                                         offsets, reinterpret_cast<const int64_t*>(offset), offset_len,
                                         reinterpret_cast<int64_t*>(out)};
        mmgen::sample_drawn(p);
      },
      "Next tokens from logits and Gumbel noise drawn ahead (csrc/cpu/sampling.cpp); CPU pointers as ints.",
      py::arg("logits"), py::arg("ld_logits"), py::arg("rows"), py::arg("n"), py::arg("temperature"),
      py::arg("top_k"), py::arg("top_p"), py::arg("do_sample"), py::arg("drawn"), py::arg("drawn_row_stride"),
      py::arg("drawn_offset_stride"), py::arg("offsets"), py::arg("offset"), py::arg("offset_len"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>());

#if MMGEN_WITH_CUDA
  m.def("cuda_runtime_version", &mmgen::cuda_runtime_version,
        "Version of the linked CUDA runtime, 1000 * major + 10 * minor.");
  m.def("cuda_device_count", &mmgen::cuda_device_count,
        "Number of visible CUDA devices; 0 without a driver or a device.");
  mmgen::bind_kernels<CudaOps>(m);
#endif
}
