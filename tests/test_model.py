"""Our hand-written Mistral against transformers' MistralForCausalLM, through the checkpoint layout both share."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cancerllm import ModelArgs, Transformer, kernels
from hf_util import assert_logits_and_gradients_match, hf_model, tiny_args


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])       # GQA ratios 1, 2, 4
def test_logits_and_gradients_match_transformers(tmp_path, n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    hf = hf_model(args)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, args.vocab_size, (2, 3 * args.sliding_window + 5))   # well past the window
    assert_logits_and_gradients_match(ours, hf, tokens)


def test_fused_loss_equals_loss_of_logits():
    model = Transformer(tiny_args())
    tokens = torch.randint(0, 256, (2, 20))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    fused = model(tokens, targets=targets)
    plain = F.cross_entropy(model(tokens).reshape(-1, 256), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)


def test_transformers_loads_what_we_save(tmp_path):
    from transformers import MistralForCausalLM
    args = tiny_args(n_kv_heads=1)
    ours = Transformer(args)
    ours.save_pretrained(tmp_path, max_shard_size=40_000)   # several shards + index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = MistralForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 30))
    assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4


def test_bf16_round_trip(tmp_path):
    args = tiny_args()
    hf = hf_model(args, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ours.save_pretrained(tmp_path / "again")
    again = Transformer.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, args.vocab_size, (1, 24))
    ref = hf(tokens).logits.float()
    ours_logits = ours(tokens).float()
    # bf16 storage: both compute in low precision, ours with fp32 norms and softmax.
    assert torch.linalg.norm(ours_logits - ref) / torch.linalg.norm(ref) < 2e-2
    fp32 = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert fp32.lm_head.weight.dtype == torch.float32


def test_packed_documents_equal_separate_forwards():
    args = tiny_args()
    model = Transformer(args)
    doc_a, doc_b = torch.randint(0, 256, (1, 13)), torch.randint(0, 256, (1, 19))
    packed = torch.cat([doc_a, doc_b], dim=1)
    cu_seqlens = torch.tensor([0, 13, 32], dtype=torch.int32)
    out = model(packed, cu_seqlens=cu_seqlens)
    assert torch.allclose(out[:, :13], model(doc_a), atol=1e-5)
    assert torch.allclose(out[:, 13:], model(doc_b), atol=1e-5)
    # Without the boundary doc B would see doc A: the masking must matter.
    assert not torch.allclose(model(packed)[:, 13:], model(doc_b), atol=1e-3)


def test_presets():
    mistral = ModelArgs.preset("mistral-7b")
    assert (mistral.dim, mistral.n_layers, mistral.n_heads, mistral.n_kv_heads, mistral.head_dim,
            mistral.hidden_dim, mistral.vocab_size, mistral.sliding_window, mistral.rope_theta,
            mistral.norm_eps) == (4096, 32, 32, 8, 128, 14336, 32000, 4096, 10000.0, 1e-5)
    assert mistral.num_params() == 7_241_732_096
    assert 0.5e6 < ModelArgs.preset("tiny").num_params() < 2e6
    assert 20e6 < ModelArgs.preset("small").num_params() < 40e6
    for name in ("tiny", "small"):
        args = ModelArgs.preset(name)
        with torch.device("meta"):
            assert sum(p.numel() for p in Transformer(args).parameters()) == args.num_params()
    # 6N plus the attention term; a window caps the keys each query sees.
    assert mistral.flops_per_token(4096) > 6 * mistral.num_params(embedding=False)
    assert mistral.flops_per_token(16384) < ModelArgs.preset("mistral-7b", sliding_window=None).flops_per_token(16384)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.preset("gpt-5")


@pytest.mark.parametrize("bad, error, match", [
    (dict(n_heads=6, n_kv_heads=4), ValueError, "multiple of n_kv_heads"),
    (dict(dim="64"), TypeError, "ModelArgs.dim"),
    (dict(sliding_window=0), ValueError, "sliding_window"),
    (dict(head_dim=15), ValueError, "head_dim"),
])
def test_model_args_refuse_bad_values(bad, error, match):
    with pytest.raises(error, match=match):
        tiny_args(**bad)


def test_forward_refuses_bad_tokens_and_positions():
    model = Transformer(tiny_args())
    with pytest.raises(TypeError, match="int32 or int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 1, 2, 128]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must have"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"positions must be in \[0, max_seq_len=128\), got values in \[-1, 2\]"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 1, 2, -1]]))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, vocab_size=256\), got values in \[0, 256\]"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="a document of 129 tokens, longer than max_seq_len=128"):
        model(torch.zeros(2, 129, dtype=torch.long), cu_seqlens=torch.tensor([0, 129, 258], dtype=torch.int32))
    with pytest.raises(ValueError, match="Transformer: cu_seqlens .* must include every multiple of T=8"):
        model(torch.zeros(2, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's values back to the host, a device sync on CUDA: every
    .item() / int() / bool() goes through aten::_local_scalar_dense, nonzero sizes its output from the data, and
    .tolist() / .numpy() of a CPU tensor skip the dispatcher, so they are counted by spies on torch.Tensor."""

    SYNCING = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in ("tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self.spy(getattr(torch.Tensor, name)))

    def spy(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCING
        return func(*args, **(kwargs or {}))


def host_reads(monkeypatch, fn):
    """(the host reads while fn() runs, its result)."""
    with HostReads(monkeypatch) as reads:
        result = fn()
    return reads.count, result


@pytest.mark.parametrize("n_layers", [1, 2])
def test_forward_reads_the_host_once_whatever_the_number_of_layers(monkeypatch, kernel_backend, n_layers):
    """The Triton path (what runs on CUDA; here under the interpreter): one host read per forward checks the
    tokens, positions and packed documents for every layer, and backward reads none. The fused loss's own reads
    (kernels.linear_cross_entropy drops ignored rows) are counted apart, by calling it alone."""
    kernel_backend("triton")
    model = Transformer(tiny_args(n_layers=n_layers, sliding_window=8))
    tokens = torch.randint(0, 256, (2, 16))
    cu_seqlens = torch.tensor([0, 5, 16, 27, 32], dtype=torch.int32)
    positions = torch.tensor([list(range(5)) + list(range(11)), list(range(11)) + list(range(5))])
    reads, logits = host_reads(monkeypatch, lambda: model(tokens, positions=positions, cu_seqlens=cu_seqlens))
    assert reads == 1
    assert host_reads(monkeypatch, lambda: logits.float().pow(2).mean().backward())[0] == 0

    targets = tokens.roll(-1, dims=1).masked_fill(torch.rand(2, 16) < 0.3, -100)
    loss_reads, _ = host_reads(monkeypatch, lambda: kernels.linear_cross_entropy(
        torch.randn(32, model.args.dim), model.lm_head.weight, targets.view(-1)))
    reads, _ = host_reads(monkeypatch, lambda: model(tokens, cu_seqlens=cu_seqlens, targets=targets))
    assert reads == 1 + loss_reads
