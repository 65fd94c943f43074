"""Test setup. Without CUDA, the Triton kernels run in the interpreter: TRITON_INTERPRET must
be set before anything imports Triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The GPU tier runs the default tiles (the library's default too: autotuning is opt-in)
    # unless the caller's environment asks otherwise; every candidate has its own test.
    os.environ.setdefault("TRITONFLASH_AUTOTUNE", "0")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier)")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)
