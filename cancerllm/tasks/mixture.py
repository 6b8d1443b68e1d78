"""The SFT mixture: which task examples, how many times, make the instruction-tuning JSONL.

    python -m cancerllm.tasks.mixture --config configs/cpu-small-sft.toml --tasks runs/tasks --out runs/sft.jsonl

reads the [sft_mixture] section of a TOML file (the SFT run config that trains on the result; keys: the fields of
`MixtureSpec`) and the datasets of `python -m cancerllm.tasks.build`, and writes {"patient_id", "prompt",
"completion"} rows, shuffled, for `python -m cancerllm.data.prepare --sft`. Per training patient of the main reports:
`json_passes` phenotype-JSON examples, `counterfactual_copies` of them the edited copies tasks.build
--counterfactual-copies wrote (the value changed in the text and in the answer, so only reading gets it right; the
plain example where the report states no editable value); per extra training patient (tasks.build
--extra-train-reports): `extra_json_passes` plain ones. Then `rare_field_passes` more plain phenotype-JSON examples
of every training patient whose answer states a rare field (one that at most `rare_field_share` of the phenotype-JSON
examples state: the receptors of breast cancers, the Gleason score of prostate cancers), so that a short SFT stage
sees enough of them to learn when to fill those fields instead of answering null; and `field_passes` ({field:
passes}) more of every example whose answer states that field, for a field the registry records for some cancer
types only (grade: the reports of the others state one, the answer is null), whose stated answers would otherwise be
outnumbered by null ones and unlearned. Then every diagnosis example
`diagnosis_passes` times and a seeded sample of `qa_examples` question-answering examples ("all": every one).
"""
import argparse
import dataclasses
import json
import random
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .build import read_jsonl
from .fields import FIELDS

SECTION = "sft_mixture"


@dataclass(frozen=True)
class MixtureSpec:
    json_passes: int = 4
    counterfactual_copies: int = 2
    extra_json_passes: int = 1
    diagnosis_passes: int = 1
    qa_examples: int | str = 1500
    rare_field_passes: int = 0
    rare_field_share: float = 0.1
    field_passes: dict = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.field_passes, dict):
            raise ValueError(f"[{SECTION}] field_passes={self.field_passes!r}: a table of field = passes")
        counts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("qa_examples", "rare_field_share", "field_passes")}
        counts.update({f"field_passes.{k}": v for k, v in self.field_passes.items()})
        bad = [f"{k}={v!r}" for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ValueError(f"[{SECTION}] {', '.join(bad)}: counts must be ints >= 0")
        if self.counterfactual_copies > self.json_passes:
            raise ValueError(f"[{SECTION}] counterfactual_copies={self.counterfactual_copies} is more than "
                             f"json_passes={self.json_passes}: the copies are some of the passes")
        qa = self.qa_examples
        if qa != "all" and (not isinstance(qa, int) or isinstance(qa, bool) or qa < 0):
            raise ValueError(f"[{SECTION}] qa_examples={qa!r}: an int >= 0 or \"all\"")
        share = self.rare_field_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"[{SECTION}] rare_field_share={share!r}: a fraction of the examples, > 0 and < 1")
        unknown = sorted(set(self.field_passes) - set(FIELDS))
        if unknown:
            raise ValueError(f"[{SECTION}] field_passes: unknown field(s) {', '.join(unknown)}; fields: "
                             f"{', '.join(FIELDS)}")


def read_spec(path) -> MixtureSpec:
    """The [sft_mixture] section of a TOML file; missing keys take MixtureSpec's defaults."""
    path = Path(path)
    section = tomllib.loads(path.read_text()).get(SECTION)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no [{SECTION}] table")
    known = {f.name for f in dataclasses.fields(MixtureSpec)}
    unknown = section.keys() - known
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [{SECTION}]; known: "
                         f"{', '.join(sorted(known))}")
    try:
        return MixtureSpec(**section)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def rare_fields(examples: list, share: float) -> list:
    """The fields that some, but at most `share`, of the phenotype-JSON examples state (their "fields" record)."""
    stated = Counter(name for r in examples for name, value in r["fields"].items() if value is not None)
    return sorted(name for name, n in stated.items() if n <= share * len(examples))


def json_passes(tasks_dir: Path, spec: MixtureSpec) -> list:
    """The phenotype-JSON part: spec.json_passes examples per training report of the main reports (the last
    counterfactual_copies of them edited where the report allows), extra_json_passes per extra report,
    rare_field_passes more of every example that states a rare field and field_passes[f] more of every one that
    states field f."""
    manifest = json.loads((tasks_dir / "manifest.json").read_text())
    built_copies = manifest["counterfactual_train"]["copies"]
    if spec.counterfactual_copies > built_copies:
        raise ValueError(f"[{SECTION}] counterfactual_copies={spec.counterfactual_copies}, but {tasks_dir} holds "
                         f"{built_copies} per report (tasks.build --counterfactual-copies)")
    if "extra_train_patients" not in manifest:
        raise ValueError(f"{tasks_dir / 'manifest.json'}: does not list the extra training patients (built by an "
                         "older tasks.build): rebuild the datasets")
    extra_patients = set(manifest["extra_train_patients"])
    examples = read_jsonl(tasks_dir / "phenotype-json" / "train.jsonl")
    train = [r for r in examples if r["patient_id"] not in extra_patients]
    extra = [r for r in examples if r["patient_id"] in extra_patients]
    edited = {}
    if spec.counterfactual_copies:
        for r in read_jsonl(tasks_dir / "phenotype-json" / "train-counterfactual.jsonl"):
            edited.setdefault(r["patient_id"], []).append(r)
    copies = [edited.get(r["patient_id"], [r] * spec.counterfactual_copies)[k]
              for k in range(spec.counterfactual_copies) for r in train]
    rare = rare_fields(examples, spec.rare_field_share) if spec.rare_field_passes else []
    stating_rare = [r for r in examples if any(r["fields"][name] is not None for name in rare)]
    stating_named = [r for name, passes in spec.field_passes.items()
                     for r in examples if r["fields"][name] is not None for _ in range(passes)]
    return (train * (spec.json_passes - spec.counterfactual_copies) + copies + extra * spec.extra_json_passes
            + stating_rare * spec.rare_field_passes + stating_named)


def write_sft_mixture(tasks_dir, out, spec: MixtureSpec) -> dict:
    """Write the mixture of the datasets in `tasks_dir` to the JSONL file `out`; -> {task: examples written}."""
    tasks_dir = Path(tasks_dir)
    qa = read_jsonl(tasks_dir / "phenotype-qa" / "train.jsonl")
    qa_examples = len(qa) if spec.qa_examples == "all" else min(spec.qa_examples, len(qa))
    parts = {"phenotype-json": json_passes(tasks_dir, spec),
             "diagnosis": read_jsonl(tasks_dir / "diagnosis" / "train.jsonl") * spec.diagnosis_passes,
             "phenotype-qa": random.Random(spec.seed).sample(qa, qa_examples)}
    rows = [r for part in parts.values() for r in part]
    random.Random(spec.seed).shuffle(rows)
    with open(out, "w") as f:
        f.writelines(json.dumps({"patient_id": r["patient_id"], "prompt": r["prompt"],
                                 "completion": r["completion"]}) + "\n" for r in rows)
    return {task: len(part) for task, part in parts.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help=f"TOML file with an [{SECTION}] table")
    p.add_argument("--tasks", default="runs/tasks", help="output directory of python -m cancerllm.tasks.build")
    p.add_argument("--out", required=True, help="the SFT JSONL to write")
    p.add_argument("--seed", type=int, default=None, help=f"override {SECTION}.seed")
    a = p.parse_args(argv)
    try:
        spec = read_spec(a.config)
        if a.seed is not None:
            spec = dataclasses.replace(spec, seed=a.seed)
        counts = write_sft_mixture(a.tasks, a.out, spec)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"cancerllm.tasks.mixture: {e}")
    print(f"wrote {a.out}: " + ", ".join(f"{n} {task}" for task, n in counts.items()) + " examples")


if __name__ == "__main__":
    main()
