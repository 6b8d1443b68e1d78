"""Checkpoint files that are missing, corrupt or describe something else get errors naming the file; a refused or
interrupted save leaves an earlier one intact."""
import json
import re

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
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling: rope_type 'dynamic' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": -2.0}), "rope_scaling: linear scaling needs factor, a positive"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    (dict(tie_word_embeddings=True), "lm_head.weight differs .* tie_word_embeddings=true"),   # two tensors
    (dict(dtype="int8", torch_dtype="int8"), "dtype"),
    (dict(rope_theta="abc"), "rope_theta must be a number, got 'abc'"),
    (dict(rope_parameters="x"), "rope_parameters must be dict, got 'x'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "abc"}), "rope_parameters.rope_theta must be a num"),
    (dict(rms_norm_eps=-1e-5), "norm_eps must be a positive finite number, got -1e-05"),
    (dict(max_position_embeddings=2**31 - 1), "max_seq_len=2147483647: its rotary tables would take 128.0 GiB"),
    (dict(num_attention_heads=0), "n_heads must be positive"),
])
def test_config_it_cannot_represent(saved, changes, match):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match) as e:
        Transformer.from_pretrained(saved)
    assert str(saved / "config.json") in str(e.value)


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


def test_integer_weights_are_refused_not_cast(saved):
    path = saved / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"] = state["model.norm.weight"].long()
    save_file(state, path)
    with pytest.raises(ValueError, match="not floating point: model.norm.weight: torch.int64"):
        Transformer.from_pretrained(saved)


# ---------------------------------------------------------------------------------------------- sharded index

def sharded_save(directory):
    model = Transformer(tiny_args())
    model.save_pretrained(directory, max_shard_size="40KB")
    return model, json.loads((directory / "model.safetensors.index.json").read_text())


def test_the_index_decides_which_file_a_tensor_is_read_from(tmp_path):
    model, index = sharded_save(tmp_path)
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    decoy = load_file(tmp_path / files[-1])            # the same tensor again, in a file read after its own
    decoy[name] = torch.zeros_like(model.state_dict()[name.removeprefix("model.")])
    save_file(decoy, tmp_path / files[-1])
    key = name.removeprefix("model.")
    assert torch.equal(Transformer.from_pretrained(tmp_path).state_dict()[key], model.state_dict()[key])


def test_a_tensor_missing_from_the_file_its_index_names_is_named(tmp_path):
    _, index = sharded_save(tmp_path)
    name, file = next(iter(index["weight_map"].items()))
    state = load_file(tmp_path / file)
    del state[name]
    save_file(state, tmp_path / file)
    with pytest.raises(ValueError, match=f"{file}: lacks {name}, which model.safetensors.index.json places there"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_outside_the_directory_are_refused(tmp_path, entry):
    directory = tmp_path / "model"
    _, index = sharded_save(directory)
    name, file = next(iter(index["weight_map"].items()))
    (tmp_path / "outside.safetensors").write_bytes((directory / file).read_bytes())    # it would load
    index["weight_map"][name] = entry
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"weight_map\[.*\] = {re.escape(repr(entry))} is not a file name in"):
        Transformer.from_pretrained(directory)


def test_a_symlink_loop_is_reported_as_one(saved):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").symlink_to(saved / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: cannot be read: a symbolic link loop"):
        Transformer.from_pretrained(saved)


# ---------------------------------------------------------------------------------------------- saving again

def contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def earlier(tmp_path):
    directory = tmp_path / "model"
    Transformer(tiny_args()).save_pretrained(directory)
    return directory


def refused_save_arguments():
    from cancerllm.tokenizer import mistral_tokenizer_path
    return [(dict(dtype=torch.int8), r"dtype must be one of torch.float32, .* got torch.int8"),
            (dict(tokenizer=mistral_tokenizer_path()), "32000 pieces but the model has vocab_size=256"),
            (dict(max_shard_size="lots"), "max_shard_size must be bytes")]


@pytest.mark.parametrize("kwargs, message", refused_save_arguments())
def test_a_refused_save_leaves_the_earlier_one_intact(earlier, kwargs, message):
    before = contents(earlier)
    with pytest.raises(ValueError, match=message):
        Transformer(tiny_args()).save_pretrained(earlier, **kwargs)
    assert contents(earlier) == before
    assert [p.name for p in earlier.parent.iterdir()] == ["model"]


def test_an_interrupted_save_leaves_the_earlier_one_intact(earlier, monkeypatch):
    import cancerllm.checkpoint as checkpoint
    before, real_save_file, calls = contents(earlier), checkpoint.save_file, []

    def disk_fills_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", disk_fills_on_the_second_shard)
    with pytest.raises(OSError, match="No space left"):
        Transformer(tiny_args()).save_pretrained(earlier, max_shard_size="40KB")
    assert contents(earlier) == before
    assert [p.name for p in earlier.parent.iterdir()] == ["model"]


def test_saving_again_replaces_only_the_files_of_the_layout(tmp_path):
    directory = tmp_path / "model"
    sharded_save(directory)
    (directory / "model_final.safetensors").write_bytes(b"the user's own")
    (directory / "notes.md").write_text("kept")
    model = Transformer(tiny_args())
    model.save_pretrained(directory)                      # one file now: the old index and shards go
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors",
                                                           "model_final.safetensors", "notes.md"]
    assert (directory / "model_final.safetensors").read_bytes() == b"the user's own"
    loaded = Transformer.from_pretrained(directory)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_save_without_tokenizer_beside_an_earlier_one_is_refused(earlier):
    (earlier / "tokenizer.model").write_bytes(b"an earlier vocabulary")
    before = contents(earlier)
    with pytest.raises(ValueError, match="tokenizer.model is from an earlier save .* pass tokenizer="):
        Transformer(tiny_args()).save_pretrained(earlier)
    assert contents(earlier) == before
