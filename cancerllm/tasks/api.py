"""The task helpers docs/design.md puts on cancerllm.Generator: a report in, phenotypes or a diagnosis out.

The report is prepared exactly as the datasets were (build.task_inputs: truncated to `max_report_chars`, and for
the diagnosis without its final-diagnosis section) and put into the same prompt template; phenotypes are decoded
under the JSON schema (constrained.py), so the answer always parses unless `max_new_tokens` cuts it short.
"""
import json
from collections import Counter

from .build import load_templates, render_prompt, task_inputs
from .fields import ALLOWED, FIELDS

_processors = {}


def _cached(generator, key, build):
    key = (str(generator.tokenizer.path), generator.args.vocab_size, *key)
    if key not in _processors:
        _processors[key] = build(generator.tokenizer, vocab_size=generator.args.vocab_size)
    return _processors[key]


def json_processor(generator):
    """The JSON-schema processor for the generator's tokenizer, built once and reused."""
    from .constrained import JsonSchemaProcessor
    return _cached(generator, ("json",), JsonSchemaProcessor)


def answer_processor(generator, field: str, templates: dict):
    """For a question about a categorical field: its allowed values or the not-mentioned answer, and nothing
    else. None for the free-text fields (primary site, histology)."""
    from .constrained import ChoiceProcessor
    if field not in ALLOWED:
        return None
    choices = ALLOWED[field] + [templates["not_mentioned"]]
    return _cached(generator, ("choice", *choices), lambda tok, vocab_size: ChoiceProcessor(tok, choices, vocab_size))


def parse_phenotypes(text: str):
    """The phenotype object of a JSON answer, or None when it does not parse or its keys are not exactly FIELDS."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or sorted(obj) != sorted(FIELDS):
        return None
    return obj


def task_prompt(task: str, report: str, templates: dict, field: str = None) -> str:
    if task == "phenotype-qa":
        instruction = templates["questions"][field]
    elif task == "phenotype-json":
        instruction = templates["json_instruction"].format(keys=", ".join(FIELDS))
    else:
        instruction = templates["diagnosis_instruction"]
    return render_prompt(templates, instruction, report)


def no_report_prompt(task: str, templates: dict, field: str = None) -> str:
    """The task's prompt with an empty report: the negative prompt of classifier-free guidance, whose answer is
    what the model says from the instruction alone (its prior over values)."""
    return task_prompt(task, "", templates, field)


def _prepared(report: str, task: str, max_report_chars, templates):
    if not isinstance(report, str) or not report.strip():
        raise ValueError("report must be a non-empty string")
    return task_inputs(report.strip(), max_report_chars, templates, Counter())[task]


def guided(guidance_scale: float, templates: dict, questions) -> dict:
    """Generator options for classifier-free guidance of a batch against each prompt without its report (1: off).
    questions: (task, field or None) of each prompt in the batch."""
    if guidance_scale == 1:
        return {}
    return {"guidance_scale": guidance_scale,
            "negative_prompts": [no_report_prompt(task, templates, field) for task, field in questions]}


def extract_phenotypes(generator, report: str, *, max_new_tokens: int = 256, max_report_chars=2000,
                       guidance_scale: float = 1.0) -> dict:
    """{field: value or None} for every phenotype field, decoded under the schema."""
    templates = load_templates()
    prompt = task_prompt("phenotype-json", _prepared(report, "phenotype-json", max_report_chars, templates),
                         templates)
    result = generator.generate([prompt], max_new_tokens=max_new_tokens, temperature=0.0, stop=templates["stop"],
                                logits_processor=json_processor(generator),
                                **guided(guidance_scale, templates, [("phenotype-json", None)]))[0]
    fields = parse_phenotypes(result.text)
    if fields is None:
        raise ValueError(f"the answer did not complete within max_new_tokens={max_new_tokens}: {result.text!r}")
    return fields


def generate_diagnosis(generator, report: str, *, max_new_tokens: int = 96, max_report_chars=2000,
                       guidance_scale: float = 1.0) -> str:
    """A one-line diagnosis statement for the report (its final-diagnosis section, if any, is not shown)."""
    templates = load_templates()
    prompt = task_prompt("diagnosis", _prepared(report, "diagnosis", max_report_chars, templates), templates)
    result = generator.generate([prompt], max_new_tokens=max_new_tokens, temperature=0.0, stop=templates["stop"],
                                **guided(guidance_scale, templates, [("diagnosis", None)]))
    return result[0].text.strip()
