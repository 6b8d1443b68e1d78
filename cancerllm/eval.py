"""Evaluate a checkpoint on a task's split, beside the baselines, on clean and perturbed reports.

    python -m cancerllm.eval --checkpoint runs/sft/export --task phenotype-json --split test \\
        --perturb misspell,ocr,counterfactual --out reports/

Systems: the checkpoint (several: their ensemble, see cancerllm.generate), the majority value per field (from the
train split), the regular-expression extractor, and peer checkpoints (--peer NAME=DIR, e.g. the general model
zero-shot or another recipe's fine-tune; --baseline-checkpoint DIR is the peer "zero-shot DIR"), each asked as its
own prompt_settings.json says (a chat model in its chat template), on the same task prompts. Peers are scored on
the clean examples and compared with the model; the perturbations run the model and the rule baselines. Scores:
- phenotype tasks: per-field P/R/F1 on normalised values, micro and macro; the study's instance-averaged set F1
  (exact and ROUGE-1 match; an instance is one question, or one report's set of "field: value" items);
- diagnosis: token F1 and ROUGE-L against the reference statement, the set F1 over its "; "-separated parts, and
  the per-field F1 of the fields the statement states (read back with the regex extractor).
Phenotype answers are decoded constrained (the JSON schema; a categorical question's values or "not mentioned")
unless --unconstrained; the JSON schema is the one per cancer type the datasets record (the fields the training
split's registry records for each type: fields.recorded_by_cancer_type) unless --open-schema, and a JSON answer's
stage is the training registry's for its cancer type, T, N and M (fields.derive_stage, as the task helpers answer)
unless --model-stage. A checkpoint whose abstention.json holds calibrated thresholds (python -m
cancerllm.tasks.abstention) withholds the JSON values it is less sure of than those, as its helpers do, unless
--no-abstain. Answers that do not parse (JSON task) count as all-null predictions and are reported.
For the phenotype tasks a paired bootstrap over the reports says how sure each of the model's wins is: per field
and micro, the F1 difference to each other system, its 95% interval, and the share of 1,000 draws the model wins.
Each perturbation reruns the same examples with perturbed reports; its table gives the headline F1 on those
examples, clean and perturbed. For counterfactual edits it also counts, per system, the answers for the edited
field that follow the text (the new value), keep the original value, or are neither.
A checkpoint that records its prompt settings (prompt_settings.json: templates, report cut) is evaluated only on
datasets built with the same ones, so that its Generator helpers answer as the evaluation did.
Writes eval_{task}_{split}.md, .json and _predictions.jsonl to --out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .tasks import extra  # noqa: F401  (first: fails naming the `tasks` extra when it is missing)
from .tasks import perturb as P
from .tasks.abstention import finish_answer, value_logprobs
from .tasks.api import guided, parse_phenotypes, processors
from .tasks.baselines import REGEX_FIELDS, majority_values, regex_extract
from .tasks.build import SPLITS, read_jsonl, task_examples
from .tasks.fields import FIELDS, normalize_value
from .tasks.mentions import find_mentions
from .tasks.metrics import field_counts, field_scores, instance_f1, paired_bootstrap, text_scores
from .tasks.prompts import (SETTINGS_FILE, TASKS, PromptSettings, diagnosis_statement, load_prompt_settings,
                            load_templates)

MAX_NEW_TOKENS = {"phenotype-qa": 24, "phenotype-json": 256, "diagnosis": 96}
BOOTSTRAP_SAMPLES = 1000


# ---------------------------------------------------------------------------------------------- inputs

def check_tokenizer(checkpoint: Path, manifest: dict, manifest_path: Path):
    from .tokenizer import open_tokenizer
    if "tokenizer" not in manifest:
        raise ValueError(f"{manifest_path}: records no tokenizer; stamp the datasets with the checkpoint's "
                         "(python -m cancerllm.tasks.build --tokenizer, or cancerllm.tasks.build.stamp_tokenizer)")
    tok = open_tokenizer(checkpoint)
    if tok.fingerprint() != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{tok.path} is not the tokenizer the datasets were built with "
                         f"({manifest['tokenizer']['path']}, recorded in {manifest_path}): rebuild the datasets "
                         "with --tokenizer pointing at the checkpoint's tokenizer, or evaluate a matching checkpoint")


def dataset_settings(data: Path, manifest: dict) -> PromptSettings:
    """The prompt settings the datasets were built with; from their manifest for datasets built before
    prompt_settings.json was written beside them."""
    if (data / SETTINGS_FILE).is_file():
        return load_prompt_settings(data)
    return PromptSettings(load_templates(manifest["sources"]["templates"]), manifest["max_report_chars"])


def check_prompt_settings(checkpoint: Path, settings: PromptSettings, data: Path):
    """A checkpoint that records its prompt settings is evaluated on datasets prompted the same way only (templates
    and report cut; its chat format is how it reads them), so that its helpers (Generator.extract_phenotypes)
    answer as the evaluation did."""
    if (checkpoint / SETTINGS_FILE).is_file() and not load_prompt_settings(checkpoint).same_prompts(settings):
        raise ValueError(f"{checkpoint / SETTINGS_FILE} differs from the prompt settings of the datasets "
                         f"({data / SETTINGS_FILE}): evaluate on datasets built with the checkpoint's templates and "
                         "report cut")


def checked_datasets(data: Path, checkpoints: list) -> PromptSettings:
    """The prompt settings of the datasets in `data`, once each fine-tuned checkpoint is checked against them."""
    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found (build the datasets: python -m cancerllm.tasks.build)")
    manifest = json.loads(manifest_path.read_text())
    settings = dataset_settings(data, manifest)
    # The datasets are text; the tokenizer they record is the one the fine-tuned model was trained with. A zero-shot
    # baseline brings its own tokenizer and reads the same prompts through it, so it is not held to that one.
    for c in checkpoints:
        check_tokenizer(c, manifest, manifest_path)
        check_prompt_settings(c, settings, data)
    return settings


def limit_patients(records: list, limit) -> list:
    """The records of the first `limit` patients (all of a patient's QA questions stay together)."""
    if limit is None:
        return records
    keep = list(dict.fromkeys(r["patient_id"] for r in records))[:limit]
    return [r for r in records if r["patient_id"] in set(keep)]


# ---------------------------------------------------------------------------------------------- systems

class ModelSystem:
    """Batched greedy generation through cancerllm.Generator. Each task prompt is rendered in the checkpoint's chat
    format (its prompt settings). Constrained (the default): JSON answers decoded under the schema, and each
    question about a categorical field answered with one of its values or "not mentioned" (questions are batched by
    field, so a batch shares one grammar).

    guidance_scale != 1: classifier-free guidance against the same prompt with an empty report
    (api.guided), which weighs what the report says against what the model answers without one.
    decoding: Generator.from_pretrained's options (dtype, quantize). recorded_fields: the JSON schema per cancer
    type (PromptSettings.recorded_fields, the datasets'), None for the open schema. stage_groups: where given, a
    JSON answer's stage is the training registry's for its cancer type, T, N and M (fields.derive_stage), as
    Generator.extract_phenotypes answers; None keeps the model's. abstain: a JSON answer withholds the values below
    the checkpoint's calibrated thresholds (its abstention.json: tasks/abstention.py), as the helpers do."""

    def __init__(self, name, checkpoint, task, batch_size, max_new_tokens, templates, constrained=True,
                 guidance_scale=1.0, decoding=None, recorded_fields=None, stage_groups=None, beams=None,
                 abstain=True):
        from .generate import Generator
        self.name, self.task, self.batch_size, self.templates = name, task, batch_size, templates
        self.generator = Generator.from_pretrained(checkpoint, **(decoding or {}))
        self.settings = self.generator.prompt_settings
        self.max_new_tokens, self.guidance_scale, self.constrained = max_new_tokens, guidance_scale, constrained
        self.recorded_fields, self.stage_groups = recorded_fields, stage_groups
        self.abstention = self.generator.abstention if abstain and task == "phenotype-json" else None
        self.beams = beams or {}
        self.tokens, self.seconds = 0, 0.0

    def processor(self, record):
        if not self.constrained:
            return None
        if self.task == "phenotype-json":
            return processors(self.generator).json(self.recorded_fields)
        if self.task == "phenotype-qa":
            return processors(self.generator).answer(record["field"], self.templates["not_mentioned"])
        return None

    def batches(self, records):
        """Index lists of at most batch_size records, one question field per batch."""
        groups = {}
        for i, r in enumerate(records):
            groups.setdefault(r.get("field"), []).append(i)
        return [idx[i:i + self.batch_size] for idx in groups.values() for i in range(0, len(idx), self.batch_size)]

    def decode(self, records, logprobs: bool = False) -> list:
        """Each record's GenerationResult, in order."""
        out = [None] * len(records)
        for idx in tqdm(self.batches(records), desc=self.name, unit="batch", leave=False):
            batch = [records[i] for i in idx]
            guidance = guided(self.guidance_scale, self.settings, [(r["task"], r.get("field")) for r in batch])
            start = time.perf_counter()
            results = self.generator.generate([self.settings.render(r["prompt"]) for r in batch],
                                              max_new_tokens=self.max_new_tokens,
                                              temperature=0.0, stop=self.templates["stop"],
                                              logits_processor=self.processor(batch[0]), logprobs=logprobs,
                                              **guidance, **self.beams)
            self.seconds += time.perf_counter() - start
            self.tokens += sum(len(r.token_ids) for r in results)
            for i, r in zip(idx, results):
                out[i] = r
        return out

    def answers(self, records) -> list[str]:
        if self.abstention is None:
            return [self.finish(r.text.strip()) for r in self.decode(records)]
        return [self.finish(r.text.strip(), self.confidences(r)) for r in self.decode(records, logprobs=True)]

    def confidences(self, result) -> dict:
        return value_logprobs(self.generator.tokenizer, result.token_ids, result.logprobs)

    def answers_with_confidence(self, records) -> tuple[list, list]:
        """JSON answers as parsed fields ({} where one does not parse), before abstention and the stage lookup,
        and each one's value_logprobs: what abstention is calibrated on."""
        results = self.decode(records, logprobs=True)
        return [parse_phenotypes(r.text.strip()) or {} for r in results], [self.confidences(r) for r in results]

    def finish(self, answer: str, confidences: dict = None) -> str:
        """The answer as the task helpers give it: a JSON answer with the values below its thresholds withheld
        (given its confidences) and its stage looked up (stage_groups)."""
        wanted = self.task == "phenotype-json" and (self.stage_groups or confidences is not None)
        fields = parse_phenotypes(answer) if wanted else None
        if fields is None:
            return answer
        finished = finish_answer(fields, confidences, self.abstention, self.stage_groups)
        return answer if finished == fields else json.dumps(finished)


class RuleSystem:
    """Majority or regex: answers computed from the report without a model."""

    def __init__(self, name, fields_of, templates):
        self.name, self.fields_of, self.templates = name, fields_of, templates

    def answers(self, records) -> list[str]:
        t = self.templates
        out = []
        for r in records:
            fields = self.fields_of(r["report"])
            if r["task"] == "phenotype-qa":
                out.append(fields[r["field"]] or t["not_mentioned"])
            elif r["task"] == "phenotype-json":
                out.append(json.dumps(fields))
            else:
                out.append(diagnosis_statement(fields, t) if any(fields.values()) else "")
        return out


# ---------------------------------------------------------------------------------------------- scoring

def qa_fields(records, answers) -> tuple[list, list]:
    """One-question examples regrouped per report -> ([{field: answer}], [gold fields]), one entry per report in the
    order reports first appear (as in every FIELD_VIEWS function)."""
    by_patient, gold_fields = {}, {}
    for r, a in zip(records, answers):
        by_patient.setdefault(r["patient_id"], {})[r["field"]] = a
        gold_fields[r["patient_id"]] = r["fields"]
    return list(by_patient.values()), [gold_fields[p] for p in by_patient]


def json_fields(records, answers) -> tuple[list, list]:
    """-> ([{field: value}], [gold fields]), one per report; an answer that does not parse predicts no field."""
    return [parse_phenotypes(a) or {} for a in answers], [r["fields"] for r in records]


FIELD_VIEWS = {"phenotype-qa": qa_fields, "phenotype-json": json_fields}


def qa_scores(records, answers, not_mentioned) -> dict:
    golds = [[r["fields"][r["field"]] or not_mentioned] for r in records]
    preds = [[a] for a in answers]
    scores = field_scores(*qa_fields(records, answers))
    for f, s in scores["fields"].items():
        idx = [i for i, r in enumerate(records) if r["field"] == f]
        s["set_f1_exact"] = instance_f1([preds[i] for i in idx], [golds[i] for i in idx], "exact")["f1"]
    return {**scores, "set_exact": instance_f1(preds, golds, "exact"),
            "set_rouge1": instance_f1(preds, golds, "rouge1"), "parse_failures": 0, "headline": scores["micro"]["f1"]}


def field_items(fields: dict) -> list[str]:
    return [f"{f}: {fields[f]}" for f in FIELDS if normalize_value(f, fields.get(f)) is not None]


def json_scores(records, answers) -> dict:
    preds, golds = json_fields(records, answers)
    scores = field_scores(preds, golds)
    items_p, items_g = [field_items(p) for p in preds], [field_items(g) for g in golds]
    return {**scores, "set_exact": instance_f1(items_p, items_g, "exact"),
            "set_rouge1": instance_f1(items_p, items_g, "rouge1"),
            "parse_failures": sum(not p for p in preds),      # a parsed answer has every key: {} is a failure
            "headline": scores["micro"]["f1"]}


def edit_following(task, perturbed, answers, original_fields: dict) -> dict:
    """On counterfactual records: how often the answer for an edited field is the new value the text now states,
    the original one, or neither. original_fields: {patient_id: fields before the edit}."""
    preds, golds = FIELD_VIEWS[task](perturbed, answers)
    out = dict.fromkeys(("new", "original", "other"), 0)
    for pid, pred, gold in zip(dict.fromkeys(r["patient_id"] for r in perturbed), preds, golds):
        for f in FIELDS:
            new, old = normalize_value(f, gold.get(f)), normalize_value(f, original_fields[pid].get(f))
            if new != old:
                answer = normalize_value(f, pred.get(f))
                out["new" if answer == new else "original" if answer == old else "other"] += 1
    return out


def stated_in_input(records) -> dict:
    """How many gold values the model's input states, per field: the ceiling of reading alone (a model may also
    infer a value the text does not state). A value counts as stated when one of the field's standard statements
    (mentions.py, as the regex baseline reads them) in the cut report gives it, or, for the fields without such
    patterns (cancer type, site, histology), when it appears verbatim (ignoring case): a lower bound for those.
    -> {field: {"n_gold", "stated", "share"}, "all": ...}, one count per report."""
    out, reports = {}, list({r["patient_id"]: r for r in records}.values())
    for f in FIELDS:
        gold = [(r, normalize_value(f, r["fields"].get(f))) for r in reports]
        gold = [(r, g) for r, g in gold if g is not None]
        if f in REGEX_FIELDS:
            stated = sum(g in {normalize_value(f, m.value) for m in find_mentions(f, r["report"])} for r, g in gold)
        else:
            stated = sum(str(r["fields"][f]).lower() in r["report"].lower() for r, _ in gold)
        out[f] = {"n_gold": len(gold), "stated": stated, "share": stated / len(gold) if gold else 0.0}
    n, stated = sum(v["n_gold"] for v in out.values()), sum(v["stated"] for v in out.values())
    out["all"] = {"n_gold": n, "stated": stated, "share": stated / n if n else 0.0}
    return out


def compare_to_model(task, records, answers_by_system, samples=BOOTSTRAP_SAMPLES) -> dict:
    """The model against every other system, per field and micro, by a paired bootstrap over the reports
    (metrics.paired_bootstrap): {system: {field: {"delta", "ci95", "wins"}}}."""
    counts = {name: field_counts(*FIELD_VIEWS[task](records, answers)) for name, answers in answers_by_system.items()}
    return {name: paired_bootstrap(counts["model"], c, samples=samples) for name, c in counts.items()
            if name != "model"}


def diagnosis_scores(records, answers, separator) -> dict:
    golds = [r["completion"] for r in records]
    text = text_scores(answers, golds)
    split = lambda s: [x.strip() for x in s.rstrip(".").split(separator.strip()) if x.strip()]
    stated = field_scores([regex_extract(a) for a in answers], [r["fields"] for r in records], fields=REGEX_FIELDS)
    return {**stated, **text, "set_exact": instance_f1(list(map(split, answers)), list(map(split, golds)), "exact"),
            "set_rouge1": instance_f1(list(map(split, answers)), list(map(split, golds)), "rouge1"),
            "parse_failures": 0, "headline": text["token_f1"]}


def score(task, records, answers, templates) -> dict:
    if task == "phenotype-qa":
        return qa_scores(records, answers, templates["not_mentioned"])
    if task == "phenotype-json":
        return json_scores(records, answers)
    return diagnosis_scores(records, answers, templates["diagnosis_statement"]["separator"])


# ---------------------------------------------------------------------------------------------- perturbations

def perturb_records(records, kind, templates, seed, misspell_rate, ocr_rate):
    """The records with perturbed reports and prompts (and, for counterfactuals, edited golds); records whose
    report states no editable value are left out of the counterfactual set, and counted."""
    out, skipped = [], 0
    for r in records:
        key = r["patient_id"]
        if kind == "misspell":
            report, fields = P.misspell(r["report"], misspell_rate, seed, key), r["fields"]
        elif kind == "ocr":
            report, fields = P.ocr_noise(r["report"], ocr_rate, seed, key), r["fields"]
        else:
            edited = P.counterfactual(r["report"], r["fields"], seed, key)
            if edited is None:
                skipped += 1
                continue
            report, fields, _ = edited
        rebuilt = task_examples(r["task"], key, report, fields, templates)
        out.append({**r, **next(e for e in rebuilt if e.get("field") == r.get("field"))})
    return out, skipped


# ---------------------------------------------------------------------------------------------- tables

def fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def fmt_comparison(c: dict) -> str:
    low, high = c["ci95"]
    return f"{c['delta']:+.3f} [{low:+.3f}, {high:+.3f}] {c['wins']:.0%}"


def markdown(result: dict) -> str:
    task, systems = result["task"], result["systems"]
    lines = [f"# {task} — {result['split']} split ({result['n_examples']} examples, {result['n_reports']} reports)",
             "", "checkpoint: " + " + ".join(f"`{c}`" for c in result["checkpoints"])
             + (f" (an ensemble of {len(result['checkpoints'])})" if len(result["checkpoints"]) > 1 else ""), ""]
    decoding = {k: v for k, v in result.get("decoding", {}).items() if v}
    if decoding:
        lines += ["decoded with " + ", ".join(f"{k} {v}" for k, v in decoding.items()), ""]
    if result.get("num_beams", 1) > 1:
        lines += [f"beam search: {result['num_beams']} beams, length penalty {result['length_penalty']}", ""]
    if task == "diagnosis":
        cols = ["token F1", "ROUGE-L", "set F1 exact", "set F1 ROUGE-1", "stated-field micro F1"]
        row = lambda s: [s["token_f1"], s["rouge_l"], s["set_exact"]["f1"], s["set_rouge1"]["f1"], s["micro"]["f1"]]
    else:
        cols = ["micro P", "micro R", "micro F1", "macro F1", "set F1 exact", "set F1 ROUGE-1", "parse failures"]
        row = lambda s: [s["micro"]["precision"], s["micro"]["recall"], s["micro"]["f1"], s["macro"]["f1"],
                         s["set_exact"]["f1"], s["set_rouge1"]["f1"], s["parse_failures"]]
    lines += ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(x) for x in row(s)) + " |" for name, s in systems.items()]
    fields, stated = next(iter(systems.values()))["fields"], result.get("stated_in_input")
    lines += ["", "Per-field F1 (normalised values; n = examples with a gold value"
              + ("; stated: the share of those gold values the model's input states, eval.stated_in_input)"
                 if stated else ")"), "",
              "| field | n | " + ("stated | " if stated else "") + " | ".join(systems) + " |",
              "|---" * (len(systems) + 2 + bool(stated)) + "|"]
    lines += [f"| {f} | {fields[f]['n_gold']} | " + (f"{stated[f]['share']:.2f} | " if stated else "")
              + " | ".join(fmt(s["fields"][f]["f1"]) for s in systems.values()) + " |" for f in fields]
    if stated:
        share = stated["all"]["share"]
        lines += ["", f"The input states {share:.0%} of the gold values ({stated['all']['stated']} of "
                  f"{stated['all']['n_gold']}): a system that answers exactly the values counted as stated, and "
                  f"nothing else, scores micro F1 {2 * share / (1 + share):.3f}."]
    if result.get("abstention"):
        lines += ["", "Abstention: a value whose log-probability is below its field's threshold (abstention.json, "
                  "calibrated on the validation patients) is withheld: "
                  + "; ".join(f"{name}: " + ", ".join(f"{f} < {t:.2f}" for f, t in thresholds.items())
                              for name, thresholds in result["abstention"].items()) + "."]
    if result.get("stage_from_tnm"):
        lines += ["", "The models' stage is the training registry's most frequent for the answer's cancer type, T, N "
                  "and M (fields.derive_stage; where the registry has no such patient, the model's own)."]
    if result["comparisons"]:
        lines += ["", "The model against each system: F1 difference, its 95% interval and the share of draws the model "
                  f"wins (paired bootstrap over the reports, {BOOTSTRAP_SAMPLES:,} draws)", "",
                  "| field | " + " | ".join(f"vs {name}" for name in result["comparisons"]) + " |",
                  "|---" * (len(result["comparisons"]) + 1) + "|"]
        lines += [f"| {f} | " + " | ".join(fmt_comparison(c[f]) for c in result["comparisons"].values()) + " |"
                  for f in [*fields, "micro"]]
    if result["robustness"]:
        lines += ["", f"Robustness ({result['headline_metric']})", "",
                  "| perturbation | system | n | clean | perturbed | drop |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['perturbation']} | {p['system']} | {p['n']} | {fmt(p['clean'])} | {fmt(p['perturbed'])} | "
                  f"{fmt(p['drop'])} |" for p in result["robustness"]]
    followed = [p for p in result["robustness"] if "edited_field_answers" in p]
    if followed:
        lines += ["", "Counterfactual edits: the answer for the edited field is the new value the text states / the "
                  "original value / neither: " + ", ".join(
                      f"{p['system']} {' / '.join(map(str, p['edited_field_answers'].values()))}" for p in followed)]
    if result.get("speed"):
        lines += ["", "Generation speed: " + ", ".join(f"{k}: {v['tokens_per_s']:.1f} tokens/s ({v['tokens']} tokens)"
                                                        for k, v in result["speed"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- entry points

def evaluate(checkpoint, task, split="test", *, data="runs/tasks", out="reports", perturb=(),
             baseline_checkpoint=None, limit=None, batch_size=8, max_new_tokens=None, seed=0, misspell_rate=0.1,
             ocr_rate=0.05, constrained=True, guidance_scale=1.0, verbose=True, peers=None, dtype=None,
             quantize=None, open_schema=False, model_stage=False, num_beams=1, length_penalty=1.0,
             abstain=True) -> dict:
    """Score the checkpoint (a directory, or a list of them decoded as an ensemble) and the baselines on
    `data/{task}/{split}.jsonl`; write the Markdown, JSON and predictions to `out` and return the result dict.
    peers: {name: checkpoint directory (or a list: an ensemble)} scored beside it on the clean examples;
    baseline_checkpoint=DIR adds the peer "zero-shot {DIR's name}". dtype and quantize: how every checkpoint is
    decoded (Generator.from_pretrained's, "fastest" resolved for the first checkpoint and recorded as the type it
    chose; default: each checkpoint's own dtype, unquantized), so that a faster
    decoding can be checked against the task metrics. JSON answers follow the datasets' schema per cancer type
    (their prompt_settings.json's recorded_fields) for every checkpoint alike; open_schema=True, or datasets
    that record none, leaves every field open. Their stage is looked up in the datasets' stage groups (as
    Generator.extract_phenotypes does) for every checkpoint alike; model_stage=True keeps each model's own. A
    checkpoint with calibrated abstention thresholds (abstention.json, tasks/abstention.py) withholds its JSON
    values below them, as its helpers do; abstain=False scores every value."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    unknown = [p for p in perturb if p not in P.PERTURBATIONS]
    if unknown:
        raise ValueError(f"--perturb: unknown {', '.join(unknown)}; known: {', '.join(P.PERTURBATIONS)}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"evaluate: {name} must be a positive int or None, got {value!r}")
    data = Path(data)
    checkpoints = [Path(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else [Path(checkpoint)]
    settings = checked_datasets(data, checkpoints)
    from .generate import decoding_dtype
    dtype = decoding_dtype(dtype, checkpoints[0])   # "fastest" measured once, for every checkpoint alike
    templates = settings.templates
    peers = dict(peers or {})
    if baseline_checkpoint:
        peers[f"zero-shot {Path(baseline_checkpoint).name}"] = baseline_checkpoint
    for name, peer in peers.items():
        if name in ("model", "majority", "regex"):
            raise ValueError(f"peers: {name!r} is the name of a built-in system; choose another")
        for c in peer if isinstance(peer, (list, tuple)) else [peer]:
            check_prompt_settings(Path(c), settings, data)
    records = limit_patients(read_jsonl(data / task / f"{split}.jsonl"), limit)
    if not records:
        raise ValueError(f"{data / task / f'{split}.jsonl'}: no examples to evaluate")
    majority = majority_values([r["fields"] for r in read_jsonl(data / "phenotype-json" / "train.jsonl")])
    budget = MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    decoding = {"dtype": dtype, "quantize": quantize}
    recorded = None if open_schema else settings.recorded_fields
    groups = None if model_stage else settings.stage_groups
    beams = {"num_beams": num_beams, "length_penalty": length_penalty}
    systems = [ModelSystem("model", checkpoints, task, batch_size, budget, templates, constrained, guidance_scale,
                           decoding, recorded, groups, beams, abstain),
               RuleSystem("majority", lambda report: majority, templates),
               RuleSystem("regex", regex_extract, templates)]
    peer_systems = [ModelSystem(name, peer, task, batch_size, budget, templates, constrained, guidance_scale,
                                decoding, recorded, groups, beams, abstain) for name, peer in peers.items()]

    clean = {s.name: s.answers(records) for s in systems + peer_systems}
    predictions = prediction_rows(records, clean)
    result = {"task": task, "split": split, "checkpoints": [str(c) for c in checkpoints],
              "n_examples": len(records),
              "n_reports": len({r["patient_id"] for r in records}), "max_new_tokens": budget,
              "constrained": constrained and task != "diagnosis",
              "schema_per_cancer_type": bool(constrained and task == "phenotype-json" and recorded),
              "stage_from_tnm": bool(task == "phenotype-json" and groups),
              "abstention": {s.name: s.abstention for s in systems + peer_systems
                             if isinstance(s, ModelSystem) and s.abstention},
              "guidance_scale": guidance_scale, **beams,
              "decoding": {"dtype": None if dtype is None else str(dtype).removeprefix("torch."),
                           "quantize": quantize},
              "headline_metric": "token F1" if task == "diagnosis" else "micro F1",
              "systems": {name: score(task, records, a, templates) for name, a in clean.items()},
              "comparisons": compare_to_model(task, records, clean) if task in FIELD_VIEWS else {},
              "stated_in_input": stated_in_input(records) if task in FIELD_VIEWS else {},
              "robustness": []}
    original_fields = {r["patient_id"]: r["fields"] for r in records}
    for kind in perturb:
        perturbed, skipped = perturb_records(records, kind, templates, seed, misspell_rate, ocr_rate)
        kept = {(r["patient_id"], r.get("field")) for r in perturbed}
        for s in systems:
            base = [(r, a) for r, a in zip(records, clean[s.name]) if (r["patient_id"], r.get("field")) in kept]
            before = score(task, [r for r, _ in base], [a for _, a in base], templates)["headline"] if base else 0.0
            answers = s.answers(perturbed)
            predictions += prediction_rows(perturbed, {s.name: answers}, kind)
            after = score(task, perturbed, answers, templates)["headline"] if perturbed else 0.0
            row = {"perturbation": kind, "system": s.name, "n": len(perturbed),
                   "skipped_no_editable_value": skipped, "clean": before, "perturbed": after, "drop": before - after}
            if kind == "counterfactual" and task in FIELD_VIEWS:
                row["edited_field_answers"] = edit_following(task, perturbed, answers, original_fields)
            result["robustness"].append(row)
    result["speed"] = {s.name: {"tokens": s.tokens, "seconds": s.seconds,
                                "tokens_per_s": s.tokens / s.seconds if s.seconds else 0.0}
                       for s in systems + peer_systems if isinstance(s, ModelSystem)}
    write(result, predictions, Path(out), verbose)
    return result


def prediction_rows(records, answers_by_system: dict, perturbation=None) -> list[dict]:
    """One row per example and system: what it answered beside the gold completion (after a counterfactual edit,
    the edited one), for error analysis."""
    return [{"patient_id": r["patient_id"], "field": r.get("field"), "perturbation": perturbation, "system": name,
             "gold": r["completion"], "answer": answer}
            for name, answers in answers_by_system.items() for r, answer in zip(records, answers)]


def write(result: dict, predictions: list, out: Path, verbose: bool):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval_{result['task']}_{result['split']}"
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    with open(f"{stem}_predictions.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in predictions)
    if verbose:
        print(table)
        print(f"wrote {stem}.md, {stem}.json and {stem}_predictions.jsonl")


def positive_int(text: str) -> int:
    """argparse type for counts: 0 or a negative number would be taken silently (0 tokens as the task default,
    --limit -1 as "all but the last report"), so argparse refuses it, naming the flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_peers(items: list[str]) -> dict:
    peers = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--peer {item!r}: expected NAME=DIR")
        if name.strip() in peers:
            raise ValueError(f"--peer: {name.strip()!r} given twice")
        peers[name.strip()] = path.strip()
    return peers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="model directory (config.json, safetensors, tokenizer); several: their ensemble")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--data", default="runs/tasks", help="output directory of python -m cancerllm.tasks.build")
    p.add_argument("--out", default="reports")
    p.add_argument("--perturb", default="", help=f"comma-separated: {','.join(P.PERTURBATIONS)}")
    p.add_argument("--baseline-checkpoint", default=None,
                   help="a Hugging Face checkpoint run zero-shot: the peer 'zero-shot NAME'")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=DIR",
                   help="another checkpoint scored beside the model on the clean examples (repeatable)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N reports only")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"tokens per answer (default per task: {MAX_NEW_TOKENS})")
    p.add_argument("--seed", type=int, default=0, help="perturbation seed")
    p.add_argument("--misspell-rate", type=float, default=0.1)
    p.add_argument("--ocr-rate", type=float, default=0.05)
    p.add_argument("--unconstrained", action="store_true",
                   help="decode JSON answers without the schema, and questions without their field's values")
    p.add_argument("--open-schema", action="store_true",
                   help="JSON answers under the one schema for every cancer type, not the fields the datasets' "
                        "registry records per type")
    p.add_argument("--model-stage", action="store_true",
                   help="keep each model's own stage in JSON answers, not the training registry's for the answer's "
                        "cancer type, T, N and M")
    p.add_argument("--no-abstain", action="store_true",
                   help="score every JSON value, not withholding those below a checkpoint's abstention.json "
                        "thresholds")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance against the prompt without its report (1: off)")
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: an answer scores its log-probability / its length ** this")
    p.add_argument("--dtype", default=None,
                   help="decode in float32, bfloat16, float16 or fastest (the faster of bf16 and fp32 on this "
                        "machine); default: each checkpoint's own")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weight-only int8 matmuls, a scale per output row (CPU; Generator's quantize)")
    a = p.parse_args(argv)
    try:
        evaluate(a.checkpoint, a.task, a.split, data=a.data, out=a.out, perturb=[x for x in a.perturb.split(",") if x],
                 baseline_checkpoint=a.baseline_checkpoint, limit=a.limit, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, seed=a.seed, misspell_rate=a.misspell_rate, ocr_rate=a.ocr_rate,
                 constrained=not a.unconstrained, guidance_scale=a.guidance_scale, peers=parse_peers(a.peer),
                 dtype=a.dtype, quantize=a.quantize, open_schema=a.open_schema, model_stage=a.model_stage,
                 num_beams=a.num_beams, length_penalty=a.length_penalty, abstain=not a.no_abstain)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"cancerllm.eval: {e}")


if __name__ == "__main__":
    main()
