"""Chat models are asked in their own chat template: prompt settings with chat_format "chat_template", rendered the
same way in SFT data (prepare --prompt-settings), in the Generator helpers and in the evaluation (also of peers)."""
import json
import shutil

import pytest
import torch

from cancerllm import ModelArgs, Transformer
from cancerllm import eval as cancer_eval
from cancerllm.data.prepare import main as prepare
from cancerllm.data.shards import read_shard
from cancerllm.generate import Generator
from cancerllm.tasks.api import extract_phenotypes, guided
from cancerllm.tasks.fields import FIELDS
from cancerllm.tasks.prompts import (SETTINGS_FILE, PromptSettings, chat_settings, load_prompt_settings,
                                     load_templates, render_chat)
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path
from tasks_util import first_reports_datasets
from test_tasks_prompts import Recorder

# SmolLM2-Instruct's template: a default system turn unless the first message is one, then ChatML turns.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REPORT = "Left breast, lumpectomy: invasive ductal carcinoma, pT2 N0. " * 3


def chat_checkpoint_files(folder, template=CHATML):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def test_a_chat_template_wraps_each_prompt_as_one_user_turn(tmp_path):
    plain = PromptSettings(load_templates(), 900)
    chat = chat_settings(plain, chat_checkpoint_files(tmp_path / "model"))
    assert chat.chat_format == "chat_template" and chat.same_prompts(plain) and chat != plain
    task_prompt = plain.prompt("phenotype-json", REPORT)
    assert chat.prompt("phenotype-json", REPORT) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{task_prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert chat.render(task_prompt) == chat.prompt("phenotype-json", REPORT)
    assert plain.render(task_prompt) == task_prompt
    assert render_chat(CHATML, "hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")

    (tmp_path / "export").mkdir()
    chat.save(tmp_path / "export")
    assert load_prompt_settings(tmp_path / "export") == chat
    assert json.loads((tmp_path / "export" / SETTINGS_FILE).read_text())["chat_template"] == CHATML
    recorder = Recorder(tmp_path / "export")            # the helpers ask a chat export in its template
    extract_phenotypes(recorder, REPORT)
    assert recorder.prompts == [chat.prompt("phenotype-json", REPORT)]
    negative = guided(2.0, chat, [("phenotype-json", None)])["negative_prompts"][0]
    assert negative.startswith("<|im_start|>system") and negative.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template, error", [
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ("{{ messages[0].content.__class__.__mro__ }}", "SecurityError|unsafe|UndefinedError"),
])
def test_a_template_that_does_not_render_is_refused_naming_the_file(tmp_path, template, error):
    folder = chat_checkpoint_files(tmp_path / "model", template)
    plain = PromptSettings(load_templates(), 900)
    try:
        settings = chat_settings(plain, folder)
    except ValueError as e:
        assert str(folder / "tokenizer_config.json") in str(e)
        assert any(word in str(e) for word in error.split("|")), str(e)
    else:   # a sandbox that renders the attribute harmlessly is fine too, as long as nothing escapes it
        assert "__mro__" in template and "class" not in settings.render("x").lower()


def test_settings_that_contradict_themselves_are_refused(tmp_path):
    templates = load_templates()
    with pytest.raises(ValueError, match="chat_template must be a Jinja template string exactly when"):
        PromptSettings(templates, 900, "chat_template")
    with pytest.raises(ValueError, match="chat_template must be a Jinja template string exactly when"):
        PromptSettings(templates, 900, "plain", CHATML)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        chat_settings(PromptSettings(templates), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no chat_template string"):
        chat_settings(PromptSettings(templates), tmp_path)
    (tmp_path / SETTINGS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{SETTINGS_FILE}: expected an object"):
        load_prompt_settings(tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    first_reports_datasets(tmp, 30)
    return tmp / "tasks"


def test_prepare_tokenizes_sft_prompts_in_the_chat_template(data, tmp_path):
    chat = chat_settings(load_prompt_settings(data), chat_checkpoint_files(tmp_path / "model"))
    chat.save(tmp_path / "model")
    source = data / "diagnosis" / "train.jsonl"
    manifest = prepare([str(source), "--sft", "--tokenizer", str(mistral_tokenizer_path()), "--out",
                        str(tmp_path / "shards"), "--quiet", "--workers", "1", "--val-fraction", "0",
                        "--prompt-settings", str(tmp_path / "model" / SETTINGS_FILE)])
    assert manifest["prompt_settings"] == chat.to_json()
    tok = Tokenizer(mistral_tokenizer_path())
    shard = read_shard(sorted((tmp_path / "shards").glob("train-*.bin"))[0])
    first = json.loads(source.read_text().splitlines()[0])
    tokens, mask = shard.doc(0).tolist(), shard.doc_mask(0).tolist()
    prompt = tok.encode(chat.render(first["prompt"]), bos=True)
    assert tokens == prompt + tok.encode(first["completion"], bos=False, eos=True)
    assert mask == [0] * len(prompt) + [1] * (len(tokens) - len(prompt))


def test_eval_asks_each_system_in_its_format_and_scores_peers_clean(data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tmp_path / "model"
    Transformer(ModelArgs.preset("tiny", vocab_size=32000, max_seq_len=2048)).save_pretrained(
        model, tokenizer=mistral_tokenizer_path())
    peer = shutil.copytree(model, tmp_path / "chat-peer")
    chat = chat_settings(load_prompt_settings(data), chat_checkpoint_files(peer))
    chat.save(peer)
    asked = []
    generate = Generator.generate

    def recording(self, prompts, *args, **kwargs):
        asked.extend((self.prompt_settings.chat_format, p) for p in prompts)
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", recording)
    result = cancer_eval.evaluate(model, "phenotype-json", data=data, out=tmp_path, limit=2, max_new_tokens=4,
                                  perturb=["misspell"], peers={"chat peer": peer}, verbose=False)
    assert set(result["systems"]) == {"model", "majority", "regex", "chat peer"}
    assert "chat peer" in result["comparisons"]
    assert {row["system"] for row in result["robustness"]} == {"model", "majority", "regex"}
    plain = [p for fmt, p in asked if fmt == "plain"]
    chatted = [p for fmt, p in asked if fmt == "chat_template"]
    assert len(plain) == 4 and len(chatted) == 2      # model clean + misspelled, the peer clean only
    assert all(p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\n") for p in chatted)
    assert all("<|im_start|>" not in p for p in plain)
    with pytest.raises(ValueError, match="'regex' is the name of a built-in system"):
        cancer_eval.evaluate(model, "phenotype-json", data=data, out=tmp_path, limit=1, peers={"regex": peer})
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        cancer_eval.parse_peers(["just-a-path"])


def test_stated_in_input_counts_what_the_cut_report_says():
    fields = dict.fromkeys(FIELDS)
    fields.update(cancer_type="Breast invasive carcinoma", primary_site="Breast", laterality="Left", pT="T2",
                  pN="N1")
    records = [{"patient_id": "a", "report": "LEFT BREAST: carcinoma, pT2 N0.", "fields": fields}]
    stated = cancer_eval.stated_in_input(records)
    assert [stated[f]["stated"] for f in ("cancer_type", "primary_site", "laterality", "pT", "pN")] == [0, 1, 1, 1, 0]
    assert stated["all"] == {"n_gold": 5, "stated": 3, "share": 0.6}
