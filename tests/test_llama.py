"""Llama-family checkpoints and tied embeddings: our model against transformers' LlamaForCausalLM (and a tied
MistralForCausalLM), through the checkpoint layout in both directions, and the tied model's one tensor in training
and decoding."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cancerllm import Generator, ModelArgs, Transformer
from cancerllm.checkpoint import save_state_dict
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
from hf_util import assert_logits_and_gradients_match, hf_model, tiny_args, tiny_llama_args
from test_decode_form import BASE, Recorder, full_logits

# Llama 3.1's rotary scaling with an original context of 32 positions: at head_dim 12 and rope_theta 500 the six
# wavelengths (6 to 1,106 positions) fall in all three of its bands (kept below 8, blended, divided above 32).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILIES = {
    "llama tied": tiny_llama_args(tie_word_embeddings=True),
    "llama untied": tiny_llama_args(),
    "mistral tied": tiny_args(tie_word_embeddings=True),     # a windowed model may tie too (GGUF imports do)
    "llama3 rope scaling": tiny_llama_args(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "linear rope scaling": tiny_args(rope_scaling={"rope_type": "linear", "factor": 2.5}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_gradients_match_transformers(tmp_path, name):
    """transformers saves, we load: logits and every gradient within 1e-4 (fp32)."""
    args = FAMILIES[name]
    hf = hf_model(args)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.args == args
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == args.tie_word_embeddings
    tokens = torch.randint(0, args.vocab_size, (2, 37))
    assert_logits_and_gradients_match(ours, hf, tokens)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_loads_what_we_save_in_its_family(tmp_path, name):
    from transformers import AutoModelForCausalLM
    args = FAMILIES[name]
    ours = Transformer(args)
    ours.save_pretrained(tmp_path, max_shard_size=40_000)   # several shards + index
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"]) == (args.family, args.tie_word_embeddings)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in names) != args.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[args.family]
    tokens = torch.randint(0, args.vocab_size, (1, 30))
    assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4
    again = Transformer.from_pretrained(tmp_path)
    assert again.args == args
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_a_tied_model_holds_one_tensor_drawn_once():
    args = tiny_llama_args(tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = Transformer(args)
    torch.manual_seed(0)
    untied = Transformer(tiny_llama_args())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert [n for n, _ in tied.named_parameters()] == [n for n, _ in untied.named_parameters()][:-1]
    assert sum(p.numel() for p in tied.parameters()) == args.num_params()
    # init_weights draws each tensor once, the output head last: the tied model is the untied one less its head.
    for name, p in tied.named_parameters():
        assert torch.equal(p, untied.get_parameter(name)), name
    # Conversions keep one tensor, to_empty from the meta device included (it gives each module a new Parameter).
    with torch.device("meta"):
        on_meta = Transformer(args)
    assert on_meta.to_empty(device="cpu").lm_head.weight is on_meta.embed_tokens.weight
    assert tied.to(torch.bfloat16).lm_head.weight is tied.embed_tokens.weight


def test_the_fused_loss_trains_the_tied_tensor_through_both_uses():
    model = Transformer(tiny_llama_args(tie_word_embeddings=True))
    tokens = torch.randint(0, 256, (2, 20))
    targets = tokens.roll(-1, dims=1)
    model(tokens, targets=targets).backward()
    fused = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(tokens).reshape(-1, 256), targets.reshape(-1)).backward()
    torch.testing.assert_close(fused, model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
    # Both uses count: rows of tokens that never appear as inputs get the output head's gradient alone.
    unused = torch.ones(256, dtype=torch.bool).index_fill_(0, tokens.flatten(), False)
    assert fused[unused].abs().max() > 0


@pytest.mark.parametrize("rope_scaling", [None, {**LLAMA3_ROPE, "original_max_position_embeddings": 8}])
def test_the_generator_decodes_a_tied_model_like_full_recomputation(rope_scaling):
    """Greedy decoding on the decoding form (fuse_for_decoding, oneDNN on and off) against the model recomputing
    the whole sequence, every step's logits; with a rotary scaling too, which decoding must take from the model."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**BASE, "sliding_window": None, "tie_word_embeddings": True, "family": "llama",
                                     "rope_theta": 100000.0, "rope_scaling": rope_scaling})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (11, 3)]
    for onednn in (True, False):
        recorder = Recorder()
        results = Generator(model, Tokenizer(mistral_tokenizer_path()), prefill_chunk=4, onednn=onednn).generate(
            prompts, max_new_tokens=9, ignore_eos=True, logits_processor=recorder)
        for prompt, result, logged in zip(prompts, results, recorder.logits):
            assert len(logged) == 9
            for t, logits in enumerate(logged):
                expected = full_logits(model, prompt + result.token_ids[:t])
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
                assert result.token_ids[t] == int(expected.argmax())


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def tied_dir(tmp_path):
    directory = tmp_path / "tied"
    Transformer(tiny_llama_args(tie_word_embeddings=True)).save_pretrained(directory)
    return directory


def add_head(directory, head):
    path = directory / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = head(state["model.embed_tokens.weight"])
    save_file(state, path)


def test_a_tied_checkpoint_may_carry_an_equal_head(tied_dir):
    add_head(tied_dir, torch.clone)
    model = Transformer.from_pretrained(tied_dir)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_a_tied_checkpoint_with_a_different_head_is_refused_naming_file_and_field(tied_dir):
    add_head(tied_dir, lambda embedding: embedding + 1e-3)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tied_dir)
    message = str(e.value)
    assert f"{tied_dir / 'model.safetensors'}: lm_head.weight differs from model.embed_tokens.weight" in message
    assert f"{tied_dir / 'config.json'} says tie_word_embeddings=true" in message


def test_saving_a_tied_state_with_two_different_tensors_writes_nothing(tmp_path):
    model = Transformer(tiny_llama_args(tie_word_embeddings=True))
    state = {**model.state_dict(), "lm_head.weight": model.embed_tokens.weight + 1}     # e.g. a bad merge
    with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens.weight, but the model's ModelArgs "
                                         "say tie_word_embeddings=True .* nothing written"):
        save_state_dict(state, model.args, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, match", [
    (dict(attention_bias=True), "attention_bias=True is not supported: the projections have no bias"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling: llama3 scaling needs low_freq_factor, a positive number; got None"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0}), "rope_parameters: llama3 scaling needs factor"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}),
     "rope_parameters: rope_type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "finetuned": True}),
     "rope_scaling: finetuned is not a field of 'linear' scaling"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be bool, got 'yes'"),
    (dict(model_type="gemma"), "model_type='gemma' is not supported: only 'mistral' and 'llama'"),
])
def test_llama_configs_it_cannot_represent_are_named(tied_dir, changes, match):
    edit_config(tied_dir, **changes)
    with pytest.raises(ValueError, match=match) as e:
        Transformer.from_pretrained(tied_dir)
    assert str(tied_dir / "config.json") in str(e.value)


def test_a_llama_config_has_no_window_and_transformers_defaults(tied_dir):
    """LlamaForCausalLM ignores a sliding_window key; a missing max_position_embeddings is LlamaConfig's 2048."""
    config = json.loads((tied_dir / "config.json").read_text())
    del config["max_position_embeddings"], config["head_dim"]
    (tied_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 16, "hidden_size": 48,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2}))
    from cancerllm.checkpoint import read_config
    args, _ = read_config(tied_dir / "config.json")
    assert (args.sliding_window, args.max_seq_len, args.head_dim, args.family) == (None, 2048, 12, "llama")


SMOLLM2_CONFIG = {     # SmolLM2-135M-Instruct's config.json as published (written by transformers 4.42)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152}


def test_rope_scaling_reads_from_either_transformers_naming(tied_dir):
    """v4's rope_scaling (its older "type" key too) and v5's rope_parameters give the same ModelArgs; llama3 without
    original_max_position_embeddings takes max_position_embeddings, as transformers does."""
    from cancerllm.checkpoint import read_config
    path = tied_dir / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("rope_parameters", "rope_scaling")}
    read = []
    for naming in ({"rope_scaling": {"type": "linear", "factor": 4}},
                   {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}}):
        path.write_text(json.dumps({**config, "rope_theta": 500.0, **naming}))
        read.append(read_config(path)[0])
    assert read[0] == read[1] and read[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    llama3 = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    path.write_text(json.dumps({**config, "max_position_embeddings": 96, "rope_scaling": llama3}))
    assert read_config(path)[0].rope_scaling["original_max_position_embeddings"] == 96


def test_smollm2s_config_reads_as_the_preset(tmp_path):
    from cancerllm.checkpoint import read_config
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    assert read_config(tmp_path / "config.json") == (ModelArgs.preset("smollm2-135m"), torch.bfloat16)


def test_llama_model_args_refuse_a_window_and_unknown_families():
    with pytest.raises(ValueError, match="Llama attends without a window"):
        tiny_llama_args(sliding_window=8)
    with pytest.raises(ValueError, match="ModelArgs.family must be one of mistral, llama, got 'gpt'"):
        tiny_llama_args(family="gpt")
    with pytest.raises(TypeError, match="ModelArgs.tie_word_embeddings must be"):
        tiny_llama_args(tie_word_embeddings=1)


def test_smollm2_preset_has_its_shape_and_parameter_count():
    args = ModelArgs.preset("smollm2-135m")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.vocab_size,
            args.sliding_window, args.rope_theta, args.norm_eps, args.max_seq_len, args.tie_word_embeddings,
            args.family) == (576, 30, 9, 3, 64, 1536, 49152, None, 100000.0, 1e-5, 8192, True, "llama")
    assert args.num_params() == 134_515_008                 # SmolLM2-135M's count
    # The tied head still multiplies: FLOPs count it whether or not it is the embedding's tensor.
    assert args.num_params(embedding=False) == ModelArgs.preset(
        "smollm2-135m", tie_word_embeddings=False).num_params(embedding=False)
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(args).parameters()) == args.num_params()


def test_checkpoints_from_before_tied_embeddings_resume_untied_models_only(tmp_path):
    """Training checkpoints written before ModelArgs.tie_word_embeddings existed record no such setting: untied."""
    from types import SimpleNamespace
    from cancerllm.train.checkpointing import CheckpointError, Checkpointer, run_settings
    from cancerllm.train.config import LoraConfig
    untied, tied = (run_settings(tiny_args(tie_word_embeddings=tie), LoraConfig()) for tie in (False, True))
    older = {key: value for key, value in untied.items() if key != "model.tie_word_embeddings"}

    def resume_with(settings):
        Checkpointer.check_settings(SimpleNamespace(settings=settings), older, tmp_path)
    resume_with(untied)
    with pytest.raises(CheckpointError, match="model.tie_word_embeddings = False there, True now"):
        resume_with(tied)
