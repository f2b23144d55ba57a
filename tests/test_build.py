"""The native extension and the installed package layout."""

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgen_engine._native import native_info


def test_native_module_matches_installed_version():
    _C = importlib.import_module("mmgen_engine._C")
    # A stale build left in the tree after a version bump shows up here.
    assert _C.__version__ == importlib.metadata.version("mmgen-engine")


def test_native_info_types():
    info = native_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert all(isinstance(a, str) and a for a in info["cuda_archs"])
    assert isinstance(info["compiler"], str) and info["compiler"].strip()
    assert info["cuda_toolkit"] is None or isinstance(info["cuda_toolkit"], str)
    assert info["cuda_runtime"] is None or isinstance(info["cuda_runtime"], str)
    assert isinstance(info["cuda_runtime_devices"], int) and info["cuda_runtime_devices"] >= 0
    # the CPU kernels (csrc/cpu/gemv.cpp) are in every build; the portable code runs everywhere
    assert info["cpu_isas"][0] == "scalar" and set(info["cpu_isas"]) <= {"scalar", "avx2", "avx512"}
    assert isinstance(info["cpu_openmp"], bool)


def test_cuda_fields_agree():
    info = native_info()
    assert bool(info["cuda_archs"]) == info["cuda"]
    assert (info["cuda_toolkit"] is not None) == info["cuda"]
    assert (info["cuda_runtime"] is not None) == info["cuda"]
    if info["cuda"]:
        # cudart is linked statically: the runtime is the toolkit's.
        assert info["cuda_toolkit"].startswith(info["cuda_runtime"] + ".")
    else:
        assert info["cuda_runtime_devices"] == 0


@pytest.mark.gpu
def test_native_sees_the_devices_torch_sees():
    info = native_info()
    if not info["cuda"]:
        pytest.skip("mmgen_engine._C was built without CUDA")
    assert info["cuda_runtime_devices"] == torch.cuda.device_count()


ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_imports():
    kernels = importlib.import_module("mmgen_engine.kernels")
    assert kernels.__name__ == "mmgen_engine.kernels"
    assert kernels.__doc__


def test_repository_root_shadows_no_installed_package():
    """A process started in the repository root has the root first on sys.path (`python -c`,
    `python -m pytest`, a notebook): transformers' model classes must import there, and the
    top-level name `kernels` must be Hugging Face's package (or nothing), never our Triton sources."""
    code = ("import sys, kernels\n"
            "from transformers import GPT2LMHeadModel, ViTModel, BlipForConditionalGeneration, GitForCausalLM\n"
            "import mmgen_engine.kernels.norm\n"
            "print(sys.path[0] == '', getattr(kernels, '__file__', None))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    first_is_cwd, kernels_file = run.stdout.split()
    assert first_is_cwd == "True"
    assert kernels_file == "None" or not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels")
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_package_layout_installs_kernels_under_mmgen_engine(tmp_path):
    """What setup.py puts in a wheel: the Triton sources as mmgen_engine/kernels/, no top-level kernels."""
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    installed = {p.name for p in (tmp_path / "mmgen_engine" / "kernels").glob("*.py")}
    assert installed == {p.name for p in (ROOT / "kernels" / "triton").glob("*.py")} and "__init__.py" in installed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmgen_engine"]


def test_cpu_only_build_without_nvcc(tmp_path):
    """With no CUDA compiler on PATH (MMGEN_CUDA=auto), CMake builds the CPU-only module: it imports,
    reports no CUDA and has no CUDA kernel launchers (the ops then never register a cuda backend),
    but has the CPU kernels."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    dirs = {str(Path(shutil.which(tool)).parent) for tool in ("cmake", "c++", "g++") if shutil.which(tool)}
    path = os.pathsep.join(d for d in sorted(dirs) if not (Path(d) / "nvcc").exists())
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = path
    build, out = tmp_path / "build", tmp_path / "out"
    configure = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                                f"-DMMGEN_OUTPUT_DIR={out}", "-DMMGEN_CUDA=auto"], env=env, capture_output=True,
                               text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    assert "CUDA OFF" in configure.stdout
    compiled = subprocess.run([cmake, "--build", str(build), "--parallel", "2"], env=env, capture_output=True,
                              text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-2000:]
    (module,) = out.glob("_C*.so")
    probe = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('mmgen_engine._C', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.cuda, hasattr(m, 'decode_attention'), m.cuda_archs, hasattr(m, 'gemv'))"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(module)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "()", "True"]  # the CPU kernels are there


def test_ops_register_the_cuda_backend_iff_the_library_has_cuda():
    from mmgen_engine.ops import available_backends, registry
    assert registry.CUDA_DEVICES == (("cuda",) if native_info()["cuda"] else ())
    cuda_ops = {op for op, backends in available_backends().items() if "cuda" in backends}
    assert cuda_ops == ({"add_layer_norm", "decode_attention", "layer_norm", "sample", "token_gather"}
                        if native_info()["cuda"] else set())


def test_cpp_program_links_the_installed_native_library(tmp_path):
    """`cmake -DMMGEN_PYTHON=OFF` builds and installs the kernels as a static library with headers; a
    plain C++ program (tests/native/embed_check.cpp) compiles against it, links, and runs here: no
    GPU is needed to query the build and the devices, or to have a launcher refuse bad arguments."""
    cmake, gxx = shutil.which("cmake"), shutil.which("g++")
    if cmake is None or gxx is None or not native_info()["cuda"]:
        pytest.skip("needs cmake, g++ and a CUDA toolkit (nvcc)")
    build, prefix = tmp_path / "build", tmp_path / "prefix"

    def run(cmd, timeout=600):
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    run([cmake, "-S", ROOT, "-B", build, "-DMMGEN_PYTHON=OFF", "-DMMGEN_CUDA=1", "-DMMGEN_CUDA_ARCHS=80"])
    run([cmake, "--build", build, "--parallel", "2"])
    run([cmake, "--install", build, "--prefix", prefix])
    assert (prefix / "lib" / "libmmgen_native.a").is_file() and (
        prefix / "include/mmgen/kernels/sampling.cuh"
    ).is_file()
    cudart = next(Path(line.split("=", 1)[1]) for line in (build / "CMakeCache.txt").read_text().splitlines()
                  if line.startswith("CUDA_cudart_static_LIBRARY"))
    exe = tmp_path / "embed_check"
    run([gxx, "-std=c++17", f"-I{prefix / 'include'}", ROOT / "tests/native/embed_check.cpp", "-o", exe,
         prefix / "lib/libmmgen_native.a", cudart, "-ldl", "-lpthread", "-lrt"])
    out = run([exe], timeout=60)
    assert "cuda 1" in out and "refused: layer_norm: null pointer" in out, out
    assert f"devices {native_info()['cuda_runtime_devices']}" in out
