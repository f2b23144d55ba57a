import os

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
