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
