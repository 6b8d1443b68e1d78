import os

# Triton kernels run here only under the interpreter, which must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different, reported seed per test: kernels must hold on any valid input, not one lucky draw."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture(autouse=True)
def kernel_test_device(request):
    """CANCERLLM_TEST_DEVICE=cuda (with TRITON_INTERPRET=0, bench/gpu.sh) runs the kernel tests' tensors on the
    GPU, so the same checks cover the compiled kernels; by default everything stays on the CPU."""
    device = os.environ.get("CANCERLLM_TEST_DEVICE", "cpu")
    if device == "cpu" or not request.module.__name__.startswith("test_kernel_"):
        yield
        return
    torch.set_default_device(device)
    yield
    torch.set_default_device(None)


@pytest.fixture
def kernel_backend():
    """kernel_backend("triton"|"torch"|"auto") forces cancerllm.kernels' path (set_backend) for this test only."""
    from cancerllm import kernels
    previous = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(previous)
