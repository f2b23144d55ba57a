import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based fuzz tests: a bounded number of examples per test in `make test` / CI; set
# MMGEN_FUZZ_EXAMPLES (e.g. 5000) for a longer search. No deadline: two shared cores time badly.
settings.register_profile("mmgen", max_examples=int(os.environ.get("MMGEN_FUZZ_EXAMPLES", "60")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("mmgen")

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


# The bundled demo pipelines, loaded once per test module (mmgen_engine is imported here, after
# TRITON_INTERPRET is set above).
@pytest.fixture(scope="module")
def captioner():
    import mmgen_engine as mm

    return mm.load(mm.demo_model("captioning"))


@pytest.fixture(scope="module")
def txt2img():
    import mmgen_engine as mm

    return mm.load(mm.demo_model("text-to-image"))
