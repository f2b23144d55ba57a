"""The native extension and the installed package layout."""

import importlib
import importlib.metadata

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


def test_kernels_subpackage_imports():
    kernels = importlib.import_module("mmgen_engine.kernels")
    assert kernels.__name__ == "mmgen_engine.kernels"
    assert kernels.__doc__
