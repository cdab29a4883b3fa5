import importlib
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


def _has_kernels(module: str) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """A `gpu` test runs only with CUDA and its kernels: mamba_ssm, or the one named `gpu(kernels="fla")`."""
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        module = marker.kwargs.get("kernels", "mamba_ssm")
        if not _has_kernels(module):
            item.add_marker(pytest.mark.skip(reason=f"needs CUDA and {module} (pip install 'ssmify[gpu]')"))
