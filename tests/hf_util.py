"""Random tiny Hugging Face Mistral models: the reference implementation our model must match."""
import torch

from cancerllm import ModelArgs


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=256,
                sliding_window=8, max_seq_len=128)
    return ModelArgs(**{**base, **overrides})


def hf_model(args: ModelArgs, dtype=torch.float32):
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(
        hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, intermediate_size=args.hidden_dim,
        vocab_size=args.vocab_size, sliding_window=args.sliding_window, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=False,
        attn_implementation="eager")
    model = MistralForCausalLM(config).to(dtype).eval()
    with torch.no_grad():   # HF initialises norms to 1: randomise them so their weights are exercised too
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1 if name.endswith("norm.weight") else 0.05)
    return model


def our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")
