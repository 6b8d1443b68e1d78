import os
import tempfile

# Triton kernels run here only under the interpreter, which must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The decoding form's measured matmul paths (cancerllm/decode_paths.py) are cached for this session only: tests
# neither read a cache another run left nor write into the user's.
os.environ["CANCERLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="cancerllm-test-cache-")
# A worker process (torchrun, the CLIs) that dies in native code prints its Python stack, which the tests show.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest
import torch

SEED_VARIABLE = "CANCERLLM_TEST_SEED"
REPLAY_SEED = pytest.StashKey()


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help=f"seed every test with this (default: ${SEED_VARIABLE}, else a fresh seed per test)")


def pytest_configure(config):
    """The seed every test must use, from --seed or CANCERLLM_TEST_SEED (checked once, before any test runs);
    None: a fresh one per test."""
    seed, value = config.getoption("seed"), os.environ.get(SEED_VARIABLE, "").strip()
    if seed is None and value:
        try:
            seed = int(value)
        except ValueError:
            raise pytest.UsageError(f"{SEED_VARIABLE} must be an integer, got {value!r}") from None
    config.stash[REPLAY_SEED] = seed


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different seed per test (kernels must hold on any valid input, not one lucky draw), printed with a
    failure so that CANCERLLM_TEST_SEED=N (or --seed N) replays it. torch's generator is seeded with it; a test
    that draws from its own generator requests this fixture for the seed."""
    seed = request.config.stash[REPLAY_SEED]
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("seed", f"replay with {SEED_VARIABLE}={seed} pytest {item.nodeid}"))
    return report


@pytest.fixture
def kernel_backend():
    """kernel_backend("triton"|"torch"|"auto") forces cancerllm.kernels' path (set_backend) for this test only."""
    from cancerllm import kernels
    previous = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(previous)


@pytest.fixture(scope="module")
def one_rank_process_group():
    """A one-process gloo group for a test module that builds training pieces (FSDP2, DCP) in-process; a module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_rank_process_group")`."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


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
