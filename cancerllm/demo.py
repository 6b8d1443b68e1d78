"""The embedded default, end to end on 2 CPU cores: `make demo` (= `python -m cancerllm.demo`).

1. task datasets from the bundled TCGA reports and registry labels, split by patient (cancerllm.tasks.build), the
   training split topped up with OCR reports of other patients for the scarce cancer types;
2. a domain tokenizer (8,000 pieces) trained on the training patients' reports;
3. pretraining shards of those reports, then pretraining from scratch of a 7M-parameter Mistral (the `small` preset
   narrowed to 4 layers of width 256) with `torchrun` on 2 processes (configs/cpu-small.toml);
4. SFT shards of the task training examples, then instruction tuning of that export (configs/cpu-small-sft.toml),
   SFT_MEMBERS times with different seeds: the fine-tuned model is their ensemble;
5. evaluation of the ensemble on the test patients, beside the majority and regular-expression baselines, on clean
   and perturbed reports (cancerllm.eval);
6. reports/demo.md, reports/demo.json and reports/loss_curve.png.

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

from .eval import evaluate
from .tasks.build import build, print_summary, read_jsonl, stamp_tokenizer
from .tasks.mixture import read_spec, write_sft_mixture
from .tokenizer import train as train_tokenizer

RUN = Path("runs/demo")
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
EVAL_PLAN = [  # (task, reports evaluated or None for all, perturbations)
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


def torchrun(config, seed, nproc, run_dir=None):
    where = ["--set", f'checkpoint.dir="{run_dir}"'] if run_dir else []
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
         "--config", config, "--no-resume", "--set", f"train.seed={seed}", *where], f"training with {config}")


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot_losses(pretraining: list, members: list, out: Path):
    """Pretraining, then each SFT member from where pretraining ended."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = max((r["step"] for r in pretraining), default=0)
    for name, records, start in [("pretraining", pretraining, 0)] + [
            (f"SFT member {k}", records, offset) for k, records in enumerate(members)]:
        train = [r for r in records if "loss" in r and not r["skipped"]]
        val = [r for r in records if "val_loss" in r]
        ax.plot([start + r["step"] for r in train], [r["loss"] for r in train], label=f"{name} train")
        ax.plot([start + r["step"] for r in val], [r["val_loss"] for r in val], "o--", label=f"{name} validation")
    ax.set_xlabel("optimizer step (pretraining, then SFT)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("cancerllm demo: pretraining and SFT on TCGA reports, 2 CPU processes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def summary_markdown(results: dict, timings: dict, info: dict, mixture, reports: Path) -> str:
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
    parser.add_argument("--seed", type=int, default=0, help="seeds the patient split, the data and the trainings")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the training runs alone (default: --seed; SFT member k gets "
                             f"{SFT_MEMBERS} * seed + k): vary it to measure the run-to-run spread on the same split "
                             "and data")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    parser.add_argument("--reports", default="reports", help="where the Markdown, JSON and PNG go")
    args = parser.parse_args(argv)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    started, timings = time.perf_counter(), {}
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
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
    torchrun("configs/cpu-small.toml", train_seed, args.nproc)
    timings["pretraining"] = time.perf_counter() - t

    t = step(f"4. instruction tuning: SFT shards, then torchrun train.py --config {SFT_CONFIG}, {SFT_MEMBERS} seeds")
    sft_examples = write_sft_mixture(tasks_dir, RUN / "sft.jsonl", mixture)
    seq_len = tomllib.loads(Path(SFT_CONFIG).read_text())["data"]["seq_len"]      # pack rows the trainer will read
    run([sys.executable, "-m", "cancerllm.data.prepare", RUN / "sft.jsonl", "--sft", "--tokenizer", tokenizer.path,
         "--out", RUN / "shards/sft", "--group-column", "patient_id", "--seed", args.seed, "--pack-to", seq_len,
         "--prompt-settings", tasks_dir / "prompt_settings.json"], "SFT prepare")
    members = [RUN / f"sft-{k}" for k in range(SFT_MEMBERS)]
    for k, member in enumerate(members):
        torchrun(SFT_CONFIG, SFT_MEMBERS * train_seed + k, args.nproc, member)   # the export records the prompts
    timings["instruction tuning"] = time.perf_counter() - t

    t = step("5. evaluation of the ensemble on the test patients, beside the baselines")
    exports = [member / "export" for member in members]
    results = {task: evaluate(exports, task, "test", data=tasks_dir, out=args.reports, perturb=perturb,
                              limit=limit, seed=args.seed)
               for task, limit, perturb in EVAL_PLAN}
    timings["evaluation"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    reports = Path(args.reports)
    pretraining, sft = read_metrics(RUN / "pretrain"), [read_metrics(member) for member in members]
    plot_losses(pretraining, sft, reports / "loss_curve.png")
    from .checkpoint import read_config
    model_args, _ = read_config(exports[0] / "config.json")
    info = {"parameters": model_args.num_params(), "vocab": tokenizer.vocab_size, "pretrain_reports": n_reports,
            "extra_train_patients": manifest["extra_train_reports_used"],
            "shape": f"{model_args.n_layers} layers, width {model_args.dim}",
            "sft_examples": sft_examples, "sft_members": SFT_MEMBERS, "pretrain_loss": loss_span(pretraining),
            "sft_loss": [loss_span(records) for records in sft]}
    (reports / "demo.md").write_text(summary_markdown(results, timings, info, mixture, reports))
    (reports / "demo.json").write_text(json.dumps({"info": info, "timings_s": timings, "results": results}, indent=2))
    print(f"\ndemo finished in {timings['total'] / 60:.1f} min: {reports}/demo.md, demo.json, loss_curve.png")


if __name__ == "__main__":
    main()
