"""The CPU emulator for CUDA kernels (tests/native/simt.h) works: compile its self-test with g++ and run it.

simt.h lets kernel sources in csrc/kernels/*.cuh be compiled with the host compiler and run on the CPU
(threads as fibers, real __syncthreads and warp-collective semantics, deadlock detection). The self-test
(tests/native/simt_selftest.cpp) checks reductions, shuffles, votes, indices, early exits, misuse
reporting, intrinsics and fp16/bf16 conversions, and exits non-zero on any failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parent / "native"


def cuda_include_dir() -> Path | None:
    """$CUDA_HOME/include, else <dir of nvcc on PATH, symlinks resolved>/../include, else /usr/local/cuda/include."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_runtime.h").is_file():
            return c
    return None


def test_simt_selftest(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    include = cuda_include_dir()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found via $CUDA_HOME, nvcc on PATH or /usr/local/cuda")
    exe = tmp_path / "simt_selftest"
    cmd = [gxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-ffp-contract=off", f"-I{include}", f"-I{NATIVE}",
           str(NATIVE / "simt_selftest.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compiling the simt self-test failed:\n{' '.join(cmd)}\n{build.stderr}"
    ours = [line for line in build.stderr.splitlines() if "warning:" in line and "tests/native/" in line]
    assert not ours, "simt.h / its self-test must compile without warnings:\n" + build.stderr

    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, f"simt self-test failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert "all passed" in run.stdout
