"""Python face of the native extension ``mmgen_engine._C`` (C++ CPU and CUDA kernels, built by CMake).

The extension never links libtorch; kernel wrappers in ``mmgen_engine.ops`` check shapes, dtypes
and contiguity and pass raw pointers and a stream.
"""

from __future__ import annotations

try:
    from mmgen_engine import _C
except ImportError as exc:
    raise ImportError(
        f"the native extension mmgen_engine._C cannot be imported ({exc}); build it from the "
        "repository root with `make install` (or `pip install -e .`)"
    ) from exc


# CpuIsa codes of csrc/native.h
CPU_ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}


def native_info() -> dict:
    """How the native library was built and what CUDA it sees now.

    Returns a dict with
      cuda (bool): CUDA kernels compiled in;
      cuda_archs (list[str]): CUDA architectures compiled for, empty iff ``cuda`` is False;
      compiler (str): host C++ compiler, "<id> <version>";
      cuda_toolkit (str | None): CUDA toolkit version used at build time;
      cuda_runtime (str | None): version of the (statically linked) CUDA runtime, "major.minor";
      cuda_runtime_devices (int): CUDA devices visible now, 0 without CUDA, driver or device;
      cpu_isas (list[str]): instruction sets of the CPU kernels this build and CPU run, widest last
        ("scalar", "avx2", "avx512"; empty for a build from before the CPU kernels);
      cpu_openmp (bool): the CPU kernels use threads (OpenMP).
    """
    info = {
        "cpu_isas": [CPU_ISA_NAMES[isa] for isa in getattr(_C, "cpu_isas", ())],
        "cpu_openmp": bool(getattr(_C, "cpu_openmp", False)),
        "cuda": _C.cuda,
        "cuda_archs": list(_C.cuda_archs),
        "compiler": _C.compiler,
        "cuda_toolkit": _C.cuda_toolkit,
        "cuda_runtime": None,
        "cuda_runtime_devices": 0,
    }
    if _C.cuda:
        version = _C.cuda_runtime_version()
        info["cuda_runtime"] = f"{version // 1000}.{version % 1000 // 10}"
        info["cuda_runtime_devices"] = _C.cuda_device_count()
    return info
