"""Shared fixtures: seeds, the GPU marker, device parametrisation and output poisoning.

Without CUDA, kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
here before any kernel is compiled). With CUDA, kernel tests run on the GPU.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from twell.testing import poison_allocations  # noqa: E402


def kernel_devices() -> list[str]:
    """Devices on which Triton kernels run in this session."""
    if HAS_CUDA:
        return ["cuda"]
    return ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison():
    """Fills the package's output allocations with NaN / a sentinel for the test's duration."""
    with poison_allocations():
        yield


@pytest.fixture(params=kernel_devices() or ["none"])
def kdevice(request):
    """The device kernel tests run on (cuda, or cpu under the interpreter)."""
    if request.param == "none":
        pytest.skip("no device can run Triton kernels (no CUDA, TRITON_INTERPRET unset)")
    return request.param
