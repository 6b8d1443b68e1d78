"""Test support for the task datasets: datasets built from the first few bundled reports, and a tiny model to
answer them."""
import csv

import torch

from cancerllm import ModelArgs, Transformer
from cancerllm.tasks.build import build
from cancerllm.tokenizer import mistral_tokenizer_path


def tiny_checkpoint(path):
    """A tiny random Mistral (seed 0) with Mistral's tokenizer, saved as a Hugging Face directory at `path`."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=32000, max_seq_len=1024))
    model.init_weights()
    model.save_pretrained(path, tokenizer=mistral_tokenizer_path())
    return path


def first_reports_datasets(folder, n: int, **build_options) -> dict:
    """Build the task datasets of the first `n` bundled reports into folder/tasks (600-character cut unless
    build_options say otherwise); returns those reports' whole text by patient id."""
    with open("data/tcga/reports.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with open(folder / "reports.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    build(folder / "reports.csv", "data/tcga/patient_labels.csv", folder / "tasks",
          **{"max_report_chars": 600, "verbose": False, **build_options})
    return {r["patient_id"]: r["text"].strip() for r in rows}
