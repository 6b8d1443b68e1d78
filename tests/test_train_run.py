"""End-to-end training runs under `torchrun --standalone --nproc_per_node=2` (gloo, CPU) of a tiny model.

One uninterrupted pretraining run is shared by several tests: its loss goes down on the bundled TCGA reports,
a run resumed from its mid-way checkpoint reproduces its losses bit for bit, its export loads in transformers
with the same logits, and a LoRA run starting from that export trains only the adapters. A second run does the same
for a tied Llama (the smollm2-135m preset's architecture, narrowed).
"""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

TINY = """
[model]
preset = "tiny"
overrides = {{dim = 32, n_layers = 2, n_heads = 4, n_kv_heads = 2, head_dim = 8, hidden_dim = 64, vocab_size = 32000}}
[data]
train = ["{shards}/train-*.bin"]
val = ["{shards}/val-*.bin"]
tokenizer = "mistral"
seq_len = 48
batch_size = 2
backend = "python"
[train]
steps = 8
grad_accum = 2
val_every = 4
val_batches = 2
[optim]
lr = 1e-2
warmup_steps = 2
[checkpoint]
dir = "{run}"
every = 4
export_dtype = "float32"
"""


def run_train(config: Path, *extra, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, str(ROOT / "train.py"), "--config", str(config), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(run_dir: Path, key="loss") -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The bundled TCGA reports, tokenized with Mistral's vocabulary by the prepare command."""
    from cancerllm.tokenizer import mistral_tokenizer_path
    out = tmp_path_factory.mktemp("shards") / "tcga"
    subprocess.run([sys.executable, "-m", "cancerllm.data.prepare", str(ROOT / "data/tcga/reports.csv"),
                    "--tokenizer", str(mistral_tokenizer_path()), "--out", str(out), "--group-column", "patient_id",
                    "--workers", "1", "--quiet"], check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("full") / "run"
    config = run.parent / "tiny.toml"
    config.write_text(TINY.format(shards=shards, run=run))
    run_train(config)
    return config, run


ACCUMULATION_WORKER = """
import json, sys
import torch
import torch.distributed as dist
from cancerllm import ModelArgs, Transformer
from cancerllm.train import step
from cancerllm.train.config import ParallelConfig
from cancerllm.train.parallel import build_mesh, full_tensor, parallelize

dist.init_process_group("gloo")
rank, cpu, cfg = dist.get_rank(), torch.device("cpu"), ParallelConfig()
data = torch.Generator().manual_seed(rank)              # each rank its own rows, with its own count of loss tokens
tokens = torch.randint(0, 256, (3, 16), generator=data)
targets = tokens.roll(-1, dims=1).masked_fill(torch.rand(3, 16, generator=data) < 0.2 + 0.3 * rank, -100)
rows = [dict(tokens=tokens[i:i + 1], targets=targets[i:i + 1], positions=None, cu_seqlens=None) for i in range(3)]
whole = [dict(tokens=tokens, targets=targets, positions=None, cu_seqlens=None)]
sharded_grads = []                                      # before each micro-batch: are the gradients so far sharded?
forward = step.micro_batch_loss


def recording_forward(model, mb):
    sharded_grads.append(all(p.grad is not None for p in model.parameters()))
    return forward(model, mb)


step.micro_batch_loss = recording_forward
out = {}
for name, batches, defer in [("whole", whole, False), ("micro", rows, False), ("deferred", rows, True)]:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                         hidden_dim=64, vocab_size=256))
    model = parallelize(model, build_mesh(cfg, 2, cpu), cfg, cpu)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out["initial"] = {n: full_tensor(p).tolist() for n, p in model.named_parameters()}   # the same every run
    sharded_grads.clear()
    result = step.train_step(model, optimizer, batches, dp_size=2, max_norm=0.0, device=cpu,
                             defer_gradient_sync=defer)
    out[name] = dict(loss=result.loss, sharded=list(sharded_grads),
                     weights={n: full_tensor(p).tolist() for n, p in model.named_parameters()})
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_accumulated_micro_batches_under_fsdp_equal_one_batch_with_sharded_gradients(tmp_path):
    """Two ranks, FSDP2: three one-row micro-batches give the update of one three-row batch, with each
    micro-batch's gradients reduce-scattered at once (sharded .grad between micro-batches); with
    parallel.defer_gradient_sync too, though FSDP2 then holds them unsharded until the last one."""
    (tmp_path / "worker.py").write_text(ACCUMULATION_WORKER)
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "worker.py"), str(tmp_path / "out.json")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["micro"]["sharded"] == [False, True, True]
    assert out["deferred"]["sharded"] == [False, False, False]
    for name in ("micro", "deferred"):
        assert out[name]["loss"] == pytest.approx(out["whole"]["loss"], rel=1e-6)
        for param, initial in out["initial"].items():
            initial = torch.tensor(initial)
            whole, accumulated = torch.tensor(out["whole"]["weights"][param]), torch.tensor(out[name]["weights"][param])
            # 1e-5 of the update, plus the weights' own fp32 rounding: a norm weight near 1 moved by ~1e-4 can land
            # one ulp (1.2e-7) apart when its update is summed in another order.
            rounding = 2 * torch.finfo(torch.float32).eps * torch.linalg.norm(whole)
            assert torch.linalg.norm(accumulated - whole) <= 1e-5 * torch.linalg.norm(whole - initial) + rounding, \
                (name, param)
            assert (accumulated - whole).abs().max() < 1e-6, (name, param)


def test_two_process_run_learns_and_writes_its_run_directory(full_run):
    _, run = full_run
    losses = records(run)
    assert sorted(losses) == list(range(1, 9))
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]) - 0.5
    val = records(run, "val_loss")
    assert sorted(val) == [4, 8] and val[8] < val[4]
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["torch"] == torch.__version__
    assert "steps = 8" in (run / "config.toml").read_text()
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000008"


def test_resume_from_checkpoint_reproduces_losses_bitwise(full_run, tmp_path):
    config, run = full_run
    # The state a run killed between its step-4 and step-8 checkpoints leaves behind (steps 5..8 logged
    # or not, step 8 never saved).
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000008")
    (resumed / "checkpoints/latest").write_text("step-00000004\n")
    config_text = config.read_text().replace(str(run), str(resumed))
    (tmp_path / "tiny.toml").write_text(config_text)
    proc = run_train(tmp_path / "tiny.toml", "--set", "checkpoint.export=false")
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout
    assert records(resumed) == records(run)                  # exact float equality, every step 1..8
    assert records(resumed, "val_loss") == records(run, "val_loss")


def test_resume_refuses_other_model_settings_and_applies_a_changed_lr(full_run, tmp_path):
    """One process resuming the 2-rank run's step-4 checkpoint: another model width is refused before the run
    directory changes; a new optim.lr takes over from step 4; started again once finished, the run leaves its final
    checkpoint as it is."""
    from cancerllm.train.optim import lr_factor
    config, run = full_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000008")
    (resumed / "checkpoints/latest").write_text("step-00000004\n")
    (tmp_path / "tiny.toml").write_text(config.read_text().replace(str(run), str(resumed)))
    run_info = (resumed / "config.toml").read_text()

    def train(*overrides):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "tiny.toml"),
                               "--set", "checkpoint.export=false", "--set", "data.val=[]", *overrides], cwd=ROOT,
                              capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = train("--set", "model.overrides.dim=64")
    assert proc.returncode == 1 and "model.dim = 32 there, 64 now" in proc.stderr, proc.stderr[-2000:]
    assert (resumed / "config.toml").read_text() == run_info
    proc = train("--set", "optim.lr=5e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "optim.lr = 0.005 (it was 0.01" in proc.stdout
    lrs = records(resumed, "lr")
    assert lrs[4] == records(run, "lr")[4]
    assert [lrs[s] for s in (5, 6, 7, 8)] == pytest.approx(
        [5e-3 * lr_factor(s - 1, warmup=2, total=8, floor=0.1) for s in (5, 6, 7, 8)], rel=1e-12)
    assert "\nlr = 0.005\n" in (resumed / "config.toml").read_text()       # what the run records is what it used
    final = resumed / "checkpoints/step-00000008/manifest.json"
    written = final.stat().st_mtime_ns
    proc = train("--set", "optim.lr=5e-3")
    assert proc.returncode == 0 and "(step 8)" in proc.stdout, proc.stderr[-2000:]
    assert final.stat().st_mtime_ns == written and sorted(records(resumed)) == list(range(1, 9))


def test_export_loads_in_transformers_with_the_same_logits(full_run):
    transformers = pytest.importorskip("transformers")
    from cancerllm import Transformer
    _, run = full_run
    export = run / "export"
    assert (export / "tokenizer.model").is_file()
    ours = Transformer.from_pretrained(export, dtype=torch.float32).eval()
    theirs = transformers.MistralForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)


def merged_export_adapted(base: dict, run: Path, *, scale: float) -> int:
    """Check a LoRA run's fp32 export against the `base` weights it trained on: each adapted weight is the base's
    plus scale * B A from the PEFT adapters beside it (trained: B not zero), every other weight the base's bit for
    bit. Returns how many weights were adapted."""
    from safetensors.torch import load_file
    merged = load_file(run / "export/model.safetensors")
    adapters = load_file(run / "export-adapters/adapter_model.safetensors")
    assert merged.keys() == base.keys()
    adapted = 0
    for name, weight in base.items():
        module = name[len("model."):-len(".weight")] if name.startswith("model.") else None
        a_key = f"base_model.model.model.{module}.lora_A.weight"
        if a_key in adapters:
            b = adapters[a_key.replace("lora_A", "lora_B")]
            assert b.abs().max() > 0, f"{name}: lora_B never trained"
            assert b.dtype == adapters[a_key].dtype == torch.float32
            expected = weight + scale * b @ adapters[a_key]
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
            adapted += 1
        else:      # embeddings, norms, the output head: frozen, bit for bit
            assert torch.equal(merged[name], weight), f"{name} changed under LoRA"
    return adapted


@pytest.mark.parametrize("mixed_precision", ["fp32", "bf16"])
def test_lora_under_fsdp_trains_only_adapters_and_export_merges_them(full_run, tmp_path, mixed_precision):
    """With bf16 compute the frozen base is stored in bf16 (lora.base_dtype = "auto") beside fp32 adapters in the
    same FSDP2 units; the fp32 export is then that bf16 base with the fp32 update added."""
    from safetensors.torch import load_file
    config, base_run = full_run
    run = tmp_path / "lora"
    (tmp_path / "lora.toml").write_text(config.read_text().replace(str(base_run), str(run)))
    proc = run_train(tmp_path / "lora.toml", "--set", f'model.init_from="{base_run / "export"}"',
                     "--set", "lora.enabled=true", "--set", "lora.rank=4", "--set", "lora.alpha=8.0",
                     "--set", "train.steps=3", "--set", "data.val=[]", "--set", "optim.lr=0.05",
                     "--set", f'parallel.mixed_precision="{mixed_precision}"')
    base = load_file(base_run / "export/model.safetensors")
    if mixed_precision == "bf16":
        base = {name: weight.bfloat16().float() for name, weight in base.items()}
    assert merged_export_adapted(base, run, scale=8.0 / 4) == 2 * 7
    assert "trainable" in proc.stdout and "optimizer state" in proc.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_fastest_precision_is_one_type_on_every_rank_and_the_export_is_in_it(full_run, tmp_path):
    """parallel.mixed_precision = "fastest" is measured by rank 0 and sent to rank 1 (ranks that computed in two
    types would fail or hang); the run's recorded config, its log and its export_dtype = "compute" name that type."""
    from safetensors.torch import load_file
    config, base_run = full_run
    run = tmp_path / "fastest"
    (tmp_path / "fastest.toml").write_text(config.read_text().replace(str(base_run), str(run)))
    proc = run_train(tmp_path / "fastest.toml", "--set", "train.steps=2", "--set", "data.val=[]",
                     "--set", 'parallel.mixed_precision="fastest"', "--set", 'checkpoint.export_dtype="compute"')
    chosen = tomllib.loads((run / "config.toml").read_text())["parallel"]["mixed_precision"]
    assert chosen in ("bf16", "fp32") and f"computing in {chosen}" in proc.stdout
    dtype = torch.bfloat16 if chosen == "bf16" else torch.float32
    assert {w.dtype for w in load_file(run / "export/model.safetensors").values()} == {dtype}


def test_bad_config_key_is_refused_before_any_work(tmp_path, shards):
    config = tmp_path / "bad.toml"
    config.write_text(TINY.format(shards=shards, run=tmp_path / "run") + "\n[log]\nevry = 3\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown key log.evry" in proc.stderr and str(config) in proc.stderr
    assert not (tmp_path / "run").exists()
    config.write_text(TINY.format(shards=shards, run=tmp_path / "run"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), "--set",
                           "train.steps=many"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.steps must be int, got 'many'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_saves_a_final_checkpoint_then_exits(tmp_path, shards):
    import signal
    import time
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(shards=shards, run=run))
    proc = subprocess.Popen([*TORCHRUN, str(ROOT / "train.py"), "--config", str(config), "--set", "train.steps=2000",
                             "--set", "checkpoint.every=0", "--set", "data.val=[]"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)                   # what a scheduler's preemption sends to torchrun
    output, _ = proc.communicate(timeout=120)
    assert "stop requested (SIGTERM): saved a checkpoint at step" in output, output[-2000:]
    assert "exiting with 143" in output and proc.returncode != 0     # an unfinished run never looks finished
    saved = int((run / "checkpoints/latest").read_text().strip().split("-")[1])
    assert 3 <= saved < 2000
    assert max(records(run)) == saved


def test_example_loss_weighting_runs_under_fsdp_and_changes_training(tmp_path):
    """Two ranks on SFT rows whose answers are 1 or ~25 tokens: both weightings train to finite losses, and
    `train.loss_weighting` reaches the step (the runs part ways after the first update). The shards record how
    their prompts were made (prepare --prompt-settings), and the export says so too."""
    from cancerllm.tasks.prompts import PromptSettings, load_prompt_settings, load_templates
    from cancerllm.tokenizer import mistral_tokenizer_path
    settings = PromptSettings(load_templates(), max_report_chars=700)
    long = " The tumour is an invasive ductal carcinoma of the left breast, grade 2, with clear margins."
    examples = [{"prompt": f"Report {i}: biopsy of the breast. Answer:", "completion": long if i % 3 else " yes"}
                for i in range(60)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "cancerllm.data.prepare", str(tmp_path / "sft.jsonl"), "--sft",
                    "--tokenizer", str(mistral_tokenizer_path()), "--out", str(shards), "--pack-to", "64",
                    "--val-fraction", "0", "--quiet", "--prompt-settings", str(settings.save(tmp_path))],
                   check=True, cwd=ROOT)
    losses = {}
    for weighting in ("token", "example"):
        run = tmp_path / weighting
        config = tmp_path / f"{weighting}.toml"
        config.write_text(TINY.format(shards=shards, run=run).replace("seq_len = 48", "seq_len = 64"))
        run_train(config, "--set", 'train.stage="sft"', "--set", f'train.loss_weighting="{weighting}"',
                  "--set", "train.steps=3", "--set", "data.val=[]",
                  "--set", f"checkpoint.export={str(weighting == 'example').lower()}")
        losses[weighting] = records(run)
    assert load_prompt_settings(tmp_path / "example" / "export") == settings
    assert all(np.isfinite(list(per_step.values())).all() and sorted(per_step) == [1, 2, 3]
               for per_step in losses.values())
    assert losses["token"][3] != pytest.approx(losses["example"][3], rel=1e-3)


# ---------------------------------------------------------------------------------------------- tied Llama

@pytest.fixture(scope="module")
def tied_llama_run(tmp_path_factory, shards):
    """The tiny run on the smollm2-135m preset's architecture (Llama, no window, tied embeddings), narrowed."""
    run = tmp_path_factory.mktemp("tied") / "run"
    config = run.parent / "tied.toml"
    config.write_text(TINY.format(shards=shards, run=run).replace('preset = "tiny"', 'preset = "smollm2-135m"'))
    return config, run, run_train(config).stdout


def test_tied_llama_trains_resumes_bitwise_and_exports_for_transformers(tied_llama_run, tmp_path):
    """FSDP2 keeps the tied embedding one parameter (in the root unit): it trains, resumes bit for bit, and exports
    as a Llama directory without lm_head.weight that transformers loads as LlamaForCausalLM with our logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    from cancerllm import ModelArgs, Transformer
    config, run, output = tied_llama_run
    args = ModelArgs.preset("smollm2-135m", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                            vocab_size=32000)
    assert f" {args.num_params():,} parameters" in output          # the sharded model counts the embedding once
    losses = records(run)
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]) - 0.5
    export = run / "export"
    saved = json.loads((export / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"], saved["tie_word_embeddings"]) == (
        "llama", ["LlamaForCausalLM"], True)
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    ours = Transformer.from_pretrained(export).eval()
    assert ours.lm_head.weight is ours.embed_tokens.weight and ours.args.family == "llama"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)

    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000008")
    (resumed / "checkpoints/latest").write_text("step-00000004\n")
    (tmp_path / "tied.toml").write_text(config.read_text().replace(str(run), str(resumed)))
    proc = run_train(tmp_path / "tied.toml", "--set", "checkpoint.export=false")
    assert "(step 4)" in proc.stdout
    assert records(resumed) == records(run)


def test_lora_from_a_tied_export_keeps_the_embedding_one_tensor(tied_llama_run, tmp_path):
    """model.init_from a tied Llama export (built on the meta device, filled from rank 0): LoRA trains the blocks'
    adapters only, and the merged export is tied again, its embedding bit for bit the base's."""
    from safetensors.torch import load_file
    config, base_run, _ = tied_llama_run
    run = tmp_path / "lora"
    (tmp_path / "lora.toml").write_text(config.read_text().replace(str(base_run), str(run)))
    run_train(tmp_path / "lora.toml", "--set", f'model.init_from="{base_run / "export"}"', "--set", "lora.enabled=true",
              "--set", "train.steps=2", "--set", "data.val=[]", "--set", "optim.lr=0.05")
    base = load_file(base_run / "export/model.safetensors")
    merged = load_file(run / "export/model.safetensors")
    assert merged.keys() == base.keys() and "lm_head.weight" not in merged
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert json.loads((run / "export/config.json").read_text())["tie_word_embeddings"] is True


# ---------------------------------------------------------------------------------------------- QLoRA

# Wide enough that every NF4 weight holds an even number of groups of 256 scales: FSDP2 splits them over 2 ranks.
QLORA_BASE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=32000)
QLORA = """
[lora]
enabled = true
rank = 4
alpha = 8.0
quantize_base = "nf4"
"""


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, shards):
    """The tiny run's data and schedule as a QLoRA run on 2 ranks over a random Hugging Face base (fp32 files)."""
    from cancerllm import ModelArgs, Transformer
    root = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    Transformer(ModelArgs.preset("tiny", **QLORA_BASE)).save_pretrained(root / "base", dtype=torch.float32)
    run = root / "run"
    config = root / "qlora.toml"
    model_section = f'[model]\ninit_from = "{root / "base"}"\n'
    config.write_text(TINY.format(shards=shards, run=run).replace("[model]\n", model_section) + QLORA)
    return config, run, root / "base", run_train(config).stdout


def test_qlora_under_fsdp_shards_nf4_checkpoints_adapters_and_exports_them_merged(qlora_run):
    """Two ranks shard the NF4 base; checkpoints leave it out; the export is the dequantized base plus the update."""
    from safetensors.torch import load_file
    from cancerllm.train.checkpointing import read_metadata
    from cancerllm.train.nf4 import dequantize, quantize
    config, run, base_dir, output = qlora_run
    assert "trainable" in output and "mesh (2,)" in output
    losses = records(run)
    assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(list(losses.values())))
    val = records(run, "val_loss")
    assert val[8] < val[4] - 0.05, val                 # the adapters learn over a frozen NF4 base
    saved = read_metadata(run / "checkpoints/step-00000008").state_dict_metadata.keys()
    assert "model.layers.0.self_attn.q_proj.lora_A" in saved and "model.embed_tokens.weight" in saved
    assert not any(key.startswith("model.layers.") and key.endswith("proj.weight") for key in saved)
    base = load_file(base_dir / "model.safetensors")
    adapted = {name: dequantize(quantize(weight, name)) for name, weight in base.items()
               if name.endswith("proj.weight")}
    assert merged_export_adapted(base | adapted, run, scale=8.0 / 4) == 2 * 7 == len(adapted)


def test_qlora_resumes_bitwise_and_refuses_a_base_that_is_not_quantized(qlora_run, tmp_path):
    config, run, _, _ = qlora_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step-00000008")
    (resumed / "checkpoints/latest").write_text("step-00000004\n")
    (tmp_path / "qlora.toml").write_text(config.read_text().replace(str(run), str(resumed)))
    proc = run_train(tmp_path / "qlora.toml", "--set", "lora.quantize_base=none", check=False)
    assert proc.returncode == 1 and "lora.quantize_base = 'nf4' there, 'none' now" in proc.stderr, proc.stderr[-2000:]
    proc = run_train(tmp_path / "qlora.toml", "--set", "checkpoint.export=false")
    assert "(step 4)" in proc.stdout
    assert records(resumed) == records(run)
    assert records(resumed, "val_loss") == records(run, "val_loss")
