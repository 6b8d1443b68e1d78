"""Packed weights (cancerllm/arena.py): one allocation in reading order, views equal to what was packed, q/k/v
fused without a copy, and a packed model that computes, saves and decodes exactly as before."""
import pytest
import torch

from cancerllm import Generator, ModelArgs, Transformer, arena
from cancerllm.model import fuse_for_decoding, pack_weights
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path


def test_pack_copies_tensors_of_any_dtype_into_one_allocation_in_order():
    tensors = [torch.randn(3, 5), torch.randint(-127, 127, (7, 3), dtype=torch.int8), torch.randn(4).bfloat16(),
               torch.empty(0, 4), torch.randn(2, 2, 2).double()]
    packed = arena.pack(tensors)
    for original, copy in zip(tensors, packed):
        assert copy.dtype == original.dtype and copy.shape == original.shape and torch.equal(copy, original)
        assert copy.is_contiguous() and copy.data_ptr() % arena.ALIGN == 0
        assert copy.data_ptr() != original.data_ptr() or not copy.numel()
    non_empty = [t for t in packed if t.numel()]
    assert arena.in_order(non_empty) and not arena.in_order(non_empty[::-1]) and not arena.in_order(tensors)
    assert arena.pack([]) == []


def test_rows_back_to_back_concatenate_as_a_view_otherwise_as_a_copy():
    q, k, v = arena.pack([torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)])   # 128, 64, 64 bytes: adjacent
    fused = arena.concat_rows([q, k, v])
    assert torch.equal(fused, torch.cat([q, k, v])) and fused.data_ptr() == q.data_ptr()
    apart = [torch.randn(8, 4), torch.randn(2, 4)]
    copied = arena.concat_rows(apart)
    assert torch.equal(copied, torch.cat(apart)) and copied.data_ptr() != apart[0].data_ptr()
    odd = arena.pack([torch.randn(3, 3), torch.randn(1, 3)])   # 36 bytes: the next starts after padding
    assert not arena.adjacent(odd) and torch.equal(arena.concat_rows(odd), torch.cat(odd))


@pytest.mark.parametrize("tied", [False, True])
def test_a_packed_model_computes_saves_and_decodes_as_before(tmp_path, tied):
    torch.manual_seed(0)
    llama = dict(family="llama", sliding_window=None) if tied else {}
    args = ModelArgs.preset("tiny", tie_word_embeddings=tied, **llama)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pack_weights(model)
    # The same weights; the products may round differently where the library picks its kernel by alignment.
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    layer = model.layers[0].self_attn
    assert arena.adjacent([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    model.save_pretrained(tmp_path)   # safetensors refuses views into one storage: saved as copies
    reloaded = Transformer.from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_the_decoding_form_streams_a_packed_model_in_place_and_packs_copies_of_another():
    """A model the Generator loads is packed in reading order: its decoding form reads the model's own memory (no
    copy of any matmul weight). A model handed over as it is keeps its memory; the form packs copies."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=32000)).bfloat16()
    loose = fuse_for_decoding(model, onednn=False)
    streamed = [t for block in loose.layers for lin in block.linears() for t in lin.streamed()]
    assert arena.in_order(streamed)
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not model_ptrs & {t.data_ptr() for t in streamed}
    pack_weights(model)
    fused = fuse_for_decoding(model, onednn=False)
    streamed = [t for block in fused.layers for lin in block.linears() for t in lin.streamed()]
    assert {t.data_ptr() for t in streamed} <= {p.data_ptr() for p in model.parameters()}


def test_the_generator_packs_the_models_it_loads(tmp_path):
    torch.manual_seed(0)
    tokenizer = Tokenizer(mistral_tokenizer_path())
    model = Transformer(ModelArgs.preset("tiny", vocab_size=32000))
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    handed = Generator(model, tokenizer)
    loaded = Generator.from_pretrained(tmp_path)
    attn = loaded.model.layers[0].self_attn
    assert arena.adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    prompt = [1, 415, 2990, 302]
    assert (handed.generate([prompt], max_new_tokens=8)[0].token_ids
            == loaded.generate([prompt], max_new_tokens=8)[0].token_ids)
