import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spin-wait on
    each other: the whole suite runs single-threaded, module-scoped fixtures included."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def back_to_one_thread():
    """Code under test may pick its own thread count (the demo measures which is fastest): undo it."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fresh_accelerate_state():
    """accelerate keeps its process state in class-level singletons: leave none behind for other tests."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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
