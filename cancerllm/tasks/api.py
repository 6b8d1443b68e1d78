"""The task helpers docs/design.md puts on cancerllm.Generator: a report in, phenotypes or a diagnosis out.

The report is prepared exactly as the checkpoint's training data was: by the prompt settings saved beside its
weights (prompt_settings.json: templates, report cut, chat format; prompts.PromptSettings), else by the packaged
templates and the datasets' default cut. Phenotypes are decoded under the JSON schema (constrained.py), so the
answer always parses unless `max_new_tokens` cuts it short.
"""
import json

from .abstention import finish_answer, value_logprobs
from .fields import FIELDS
from .prompts import PromptSettings, load_prompt_settings, no_report_prompt

# max_report_chars's default: the cut of the prompt settings in use.
FROM_SETTINGS = "from settings"


def processors(generator):
    """The generator's constrained-decoding processors (constrained.TaskProcessors), created on first use and kept
    on the generator, so each grammar compiles once per generator and goes away with it."""
    from .constrained import TaskProcessors
    if getattr(generator, "task_processors", None) is None:
        generator.task_processors = TaskProcessors(generator.tokenizer, vocab_size=generator.args.vocab_size)
    return generator.task_processors


def checkpoint_settings(generator) -> PromptSettings:
    """The prompt settings of the checkpoint the generator was loaded from (Generator.from_pretrained reads them),
    else the packaged defaults (load_prompt_settings without a directory)."""
    return generator.prompt_settings or load_prompt_settings()


def parse_phenotypes(text: str):
    """The phenotype object of a JSON answer, or None when it does not parse or its keys are not exactly FIELDS."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or sorted(obj) != sorted(FIELDS):
        return None
    return obj


def guided(guidance_scale: float, settings: PromptSettings, questions) -> dict:
    """Generator options for classifier-free guidance of a batch against each prompt without its report (1: off),
    rendered in the settings' chat format as the prompts are. questions: (task, field or None) of each prompt."""
    if guidance_scale == 1:
        return {}
    return {"guidance_scale": guidance_scale,
            "negative_prompts": [settings.render(no_report_prompt(task, settings.templates, field))
                                 for task, field in questions]}


def settings_for(generator, max_report_chars, prompt_settings) -> PromptSettings:
    settings = prompt_settings or checkpoint_settings(generator)
    if max_report_chars == FROM_SETTINGS:
        return settings
    return settings.with_cut(max_report_chars)


def extract_phenotypes(generator, report: str, *, max_new_tokens: int = 256, max_report_chars=FROM_SETTINGS,
                       guidance_scale: float = 1.0, prompt_settings: PromptSettings = None,
                       stage_from_tnm: bool = True, num_beams: int = 1, length_penalty: float = 1.0,
                       abstain: bool = True) -> dict:
    """{field: value or None} for every phenotype field, decoded under the schema (per cancer type when the
    settings record the fields the registry records per type: PromptSettings.recorded_fields). A value whose
    log-probability is below its field's threshold in the checkpoint's abstention.json (calibrated on validation
    patients: tasks/abstention.py) is withheld (None); abstain=False gives every value. The stage is then the
    training registry's for the answer's cancer type, T, N and M where the settings record those groups
    (PromptSettings.stage_groups, fields.derive_stage); stage_from_tnm=False keeps the model's own.

    prompt_settings: how to prompt (default: the checkpoint's prompt_settings.json, else the packaged templates and
    a 2,000-character report cut); max_report_chars overrides its cut (None: the whole report). num_beams,
    length_penalty: beam search (Generator.generate's; 1: greedy, as the demo's evaluation decodes)."""
    settings = settings_for(generator, max_report_chars, prompt_settings)
    templates = settings.templates
    thresholds = getattr(generator, "abstention", None) if abstain else None
    result = generator.generate([settings.prompt("phenotype-json", report)], max_new_tokens=max_new_tokens,
                                temperature=0.0, stop=templates["stop"],
                                logits_processor=processors(generator).json(settings.recorded_fields),
                                num_beams=num_beams, length_penalty=length_penalty, logprobs=bool(thresholds),
                                **guided(guidance_scale, settings, [("phenotype-json", None)]))[0]
    fields = parse_phenotypes(result.text)
    if fields is None:
        raise ValueError(f"the answer did not complete within max_new_tokens={max_new_tokens}: {result.text!r}")
    confidences = value_logprobs(generator.tokenizer, result.token_ids, result.logprobs) if thresholds else None
    return finish_answer(fields, confidences, thresholds, settings.stage_groups if stage_from_tnm else None)


def generate_diagnosis(generator, report: str, *, max_new_tokens: int = 96, max_report_chars=FROM_SETTINGS,
                       guidance_scale: float = 1.0, prompt_settings: PromptSettings = None) -> str:
    """A one-line diagnosis statement for the report (its final-diagnosis section, if any, is not shown).
    prompt_settings and max_report_chars: as for extract_phenotypes."""
    settings = settings_for(generator, max_report_chars, prompt_settings)
    templates = settings.templates
    result = generator.generate([settings.prompt("diagnosis", report)], max_new_tokens=max_new_tokens,
                                temperature=0.0, stop=templates["stop"],
                                **guided(guidance_scale, settings, [("diagnosis", None)]))
    return result[0].text.strip()
