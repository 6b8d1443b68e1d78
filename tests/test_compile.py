"""torch.compile'd blocks (parallel.compile = true) against eager: the same loss and gradients through our autograd
Functions (rotary, RMSNorm, attention, the fused loss), on the CPU's reference kernels.

Whole rows compile with inductor, as the trainer does, into one graph per block. Packed documents go through the
CPU reference attention's per-document loop, whose offsets are read to the host (a graph break each); inductor
would compile C++ for every piece between them (~100 s on two cores), so that case uses aot_eager, which traces
the same graphs and their backward without generating code.
"""
import copy

import pytest
import torch

from cancerllm import ModelArgs, Transformer
from cancerllm.train.config import ParallelConfig
from cancerllm.train.parallel import build_mesh, parallelize

CPU = torch.device("cpu")
B, T = 2, 24


pytestmark = pytest.mark.usefixtures("one_rank_process_group")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model():
    return Transformer(ModelArgs.preset("tiny", n_layers=2, vocab_size=512, sliding_window=16))


def loss_and_grads(model, tokens, targets, cu_seqlens):
    loss = model(tokens, cu_seqlens=cu_seqlens, targets=targets)
    loss.backward()
    return loss.detach(), {name.replace("._orig_mod", ""): p.grad for name, p in model.named_parameters()}


def assert_same_step(eager, compiled, cu_seqlens=None):
    tokens = torch.randint(0, 512, (B, T))
    targets = tokens.roll(-1, dims=1).masked_fill(torch.rand(B, T) < 0.2, -100)
    loss, grads = loss_and_grads(eager, tokens, targets, cu_seqlens)
    compiled_loss, compiled_grads = loss_and_grads(compiled, tokens, targets, cu_seqlens)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        error = torch.linalg.norm(compiled_grads[name] - grad) / torch.linalg.norm(grad)
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"
        assert (compiled_grads[name] - grad).abs().max() < 1e-5, name


def test_compiled_blocks_match_eager_in_one_graph_each():
    eager = tiny_model()
    cfg = ParallelConfig(compile=True)
    compiled = parallelize(copy.deepcopy(eager), build_mesh(cfg, 1, CPU), cfg, CPU)
    assert all(hasattr(block, "_orig_mod") for block in compiled.layers)
    assert_same_step(eager, compiled)
    h = torch.randn(B, T, eager.args.dim)
    cos, sin = eager.rope_cos[:T].expand(B, T, -1), eager.rope_sin[:T].expand(B, T, -1)
    explained = torch._dynamo.explain(eager.layers[0])(h, cos, sin)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def test_compiled_blocks_match_eager_on_packed_documents():
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    for i, block in enumerate(compiled.layers):
        compiled.layers[i] = torch.compile(block, fullgraph=False, backend="aot_eager")
    assert_same_step(eager, compiled, cu_seqlens=torch.tensor([0, 5, 24, 37, 48], dtype=torch.int32))
