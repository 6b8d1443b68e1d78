"""Checkpoint files that are missing, corrupt or describe something else get errors naming the file."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cancerllm import Transformer
from cancerllm.checkpoint import config_dict, read_config
from hf_util import tiny_args


@pytest.fixture
def saved(tmp_path):
    args = tiny_args()
    Transformer(args).save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_config_names_of_transformers_v4_and_v5(tmp_path):
    args = tiny_args(rope_theta=50000.0)
    cfg = config_dict(args, torch.bfloat16)
    v4 = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "torch_dtype")}
    for name, variant in (("v4", v4), ("v5", v5)):
        (tmp_path / name).write_text(json.dumps(variant))
        read_args, dtype = read_config(tmp_path / name)
        assert read_args == args and dtype == torch.bfloat16, name


def test_missing_directory_and_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(saved)


def test_missing_shard_is_named(tmp_path):
    Transformer(tiny_args()).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Transformer.from_pretrained(tmp_path)


def test_truncated_shard_is_named(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        Transformer.from_pretrained(saved)


def test_corrupt_config_names_the_line(saved):
    (saved / "config.json").write_text('{\n  "model_type": "mistral",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ValueError, match=r"config.json:3"):
        Transformer.from_pretrained(saved)


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size="64"), "hidden_size must be int"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers must be int"),
    (dict(model_type="llama"), "model_type"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(dtype="int8", torch_dtype="int8"), "dtype"),
])
def test_config_it_cannot_represent(saved, changes, match):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        Transformer.from_pretrained(saved)


def test_state_dict_mismatches_are_named(saved):
    path = saved / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, path)
    with pytest.raises(ValueError) as info:
        Transformer.from_pretrained(saved)
    message = str(info.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected: model.layers.0.extra.weight" in message
    assert "model.norm.weight: (65,) in the file, (64,) expected" in message


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    from cancerllm.tokenizer import mistral_tokenizer_path
    with pytest.raises(ValueError, match="32000 pieces but the model has vocab_size=256"):
        Transformer(tiny_args()).save_pretrained(tmp_path, tokenizer=mistral_tokenizer_path())


def test_no_pickle_in_checkpoints(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
