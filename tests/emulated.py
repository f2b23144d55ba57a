"""Build and load ``_emulated_kernels``: the CUDA kernels of csrc/kernels compiled with g++ against the
CPU emulator tests/native/simt.h, behind the production bindings (tests/native/emulated_kernels.cpp).

The module is cached under build/emulated/<hash of its sources>, so a test session compiles it once
(about a minute on two cores) and later sessions reuse it while the sources are unchanged. Needs g++
and the CUDA headers (cuda_fp16.h), found as tests/test_simt.py finds them; tests skip without them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pybind11
import pytest
from test_simt import NATIVE, cuda_include_dir

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NAME = "_emulated_kernels"


def _sources() -> list[Path]:
    return sorted([*CSRC.glob("kernels/*"), CSRC / "kernel_bindings.h", *NATIVE.glob("*.h"),
                   NATIVE / "emulated_kernels.cpp"])


def load():
    """The emulated kernels module (built if needed); skips the calling test without g++ or CUDA headers."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    gxx, include = shutil.which("g++"), cuda_include_dir()
    if gxx is None or include is None:
        pytest.skip("the emulated CUDA kernels need g++ and the CUDA headers")
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = ROOT / "build" / "emulated" / digest.hexdigest()[:16]
    target = out_dir / (NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        cmd = [gxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
               "-fno-strict-aliasing", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
               f"-I{CSRC}", f"-I{NATIVE}", f"-I{include}", str(NATIVE / "emulated_kernels.cpp"), "-o", str(tmp)]
        build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, f"building the emulated kernels failed:\n{' '.join(cmd)}\n{build.stderr[-4000:]}"
        tmp.rename(target)
    spec = importlib.util.spec_from_file_location(NAME, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module
