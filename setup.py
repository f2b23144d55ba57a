"""Build script: packages, and the native extension mmgen_engine._C built with CMake.

Project metadata lives in pyproject.toml. The extension is configured by CMakeLists.txt; the
environment variables MMGEN_CUDA (auto | 0 | 1) and MMGEN_CUDA_ARCHS (default 80;90a) are passed
through to it. Works for `pip install .` and `pip install -e .`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only learns its name."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building mmgen_engine._C needs cmake >= 3.24 on PATH")
        # setuptools copies the module into the source tree afterwards for editable installs.
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build directory keeps rebuilds incremental, also for editable installs
        # (which would otherwise build in a fresh temporary directory each time).
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        configure = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMMGEN_OUTPUT_DIR={target.parent}",
            # Always passed, so that a changed (or unset) variable reconfigures a cached build.
            f"-DMMGEN_CUDA={os.environ.get('MMGEN_CUDA') or 'auto'}",
            f"-DMMGEN_CUDA_ARCHS={os.environ.get('MMGEN_CUDA_ARCHS', '')}",
        ]
        jobs = self.parallel or os.cpu_count() or 1
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)
        if not target.is_file():
            raise RuntimeError(f"CMake did not produce {target}")


setup(
    packages=find_packages(include=["mmgen_engine", "mmgen_engine.*"]) + ["mmgen_engine.kernels"],
    # The Triton kernels live in kernels/triton/ and install as mmgen_engine.kernels. kernels/ itself
    # is no package (no __init__.py): a top-level `import kernels` run from a checkout's root must
    # find Hugging Face's `kernels` (a transformers dependency), never these sources.
    package_dir={"mmgen_engine": "mmgen_engine", "mmgen_engine.kernels": "kernels/triton"},
    # Demo checkpoints ship in the wheel.
    package_data={
        "mmgen_engine": [
            "demo/models/**/*.json",
            "demo/models/**/*.safetensors",
            "demo/models/**/*.txt",
            "serving/playground.html",
        ]
    },
    ext_modules=[CMakeExtension("mmgen_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
