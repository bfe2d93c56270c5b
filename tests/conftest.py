import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config):
    # Compiled kernels go to a directory of this session, not ~/.cache, unless one is chosen.
    if not os.environ.get("VLLM_ATOM_KERNEL_CACHE"):
        os.environ["VLLM_ATOM_KERNEL_CACHE"] = d = tempfile.mkdtemp(prefix="vllm-atom-kernels-")
        config.add_cleanup(lambda: shutil.rmtree(d, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tests/gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
