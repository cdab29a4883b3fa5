import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_mamba_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _has_mamba_kernels():
        return
    skip = pytest.mark.skip(reason="needs CUDA and mamba_ssm (pip install 'ssmify[gpu]')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
