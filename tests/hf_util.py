"""Random tiny Hugging Face Mistral and Llama models: the reference implementations our model must match."""
import torch
import torch.nn.functional as F

from cancerllm import ModelArgs


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=256,
                sliding_window=8, max_seq_len=128)
    return ModelArgs(**{**base, **overrides})


def tiny_llama_args(**overrides) -> ModelArgs:
    """GQA (6 heads over 2), head_dim 12 != dim / heads = 8, rope_theta 500: each a way Llama configs differ."""
    base = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=12, hidden_dim=80, vocab_size=256,
                sliding_window=None, rope_theta=500.0, max_seq_len=128, family="llama")
    return ModelArgs(**{**base, **overrides})


def hf_model(args: ModelArgs, dtype=torch.float32):
    """transformers' model of args' family (MistralForCausalLM or LlamaForCausalLM), tied like args."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    shape = dict(
        hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, intermediate_size=args.hidden_dim,
        vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_parameters={**(args.rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        tie_word_embeddings=args.tie_word_embeddings, attn_implementation="eager")
    if args.family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=args.sliding_window))
    model = model.to(dtype).eval()
    with torch.no_grad():   # HF initialises norms to 1: randomise them so their weights are exercised too
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1 if name.endswith("norm.weight") else 0.05)
    return model


def our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def loss_of(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def assert_logits_and_gradients_match(ours, hf, tokens):
    """fp32: our logits within 1e-4 of transformers', and every parameter's gradient within 1e-4 of its own (relative
    to its norm), parameter for parameter: a tied model has one embedding tensor on both sides."""
    hf_logits = hf(tokens).logits
    our_logits = ours(tokens)
    assert (our_logits - hf_logits).abs().max() <= 1e-4
    loss_of(hf_logits, tokens).backward()
    loss_of(our_logits, tokens).backward()
    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())
    assert sorted(ours_params) == sorted(map(our_name, hf_params))
    for name, p in hf_params.items():
        g, ref = ours_params[our_name(name)].grad, p.grad
        assert torch.linalg.norm(g - ref) <= 1e-4 * torch.linalg.norm(ref) + 1e-7, name
