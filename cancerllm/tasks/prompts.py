"""How a report becomes a prompt, the same way for training (build.py) and inference (api.py, eval.py).

- templates (templates.json): the prompt around an instruction and a report, each task's instruction, the answer
  forms (the not-mentioned answer, the diagnosis statement) and the stop strings;
- the report cut (`truncate_report`, `task_inputs`): reports longer than max_report_chars keep their head, every
  sentence that states a staging, grade, receptor or Gleason value in a standard form, and as much of their key
  section as fits (the synoptic/staging summary when the report has one, else the final-diagnosis section); the
  diagnosis task sees the report without its final-diagnosis section (`find_diagnosis_section`);
- `task_prompt`: one task's prompt for a (cut) report;
- `PromptSettings`: the templates, the cut and the chat format together, saved as prompt_settings.json beside the
  datasets (build.py) and beside an SFT export's weights, and read back by the task helpers, so a checkpoint is
  asked exactly as it was trained. A chat model (chat_format "chat_template") gets each task prompt as one user
  turn of its own Jinja chat template (`render`), in training (data.prepare --sft) and at inference alike.
"""
import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .fields import FIELDS, check_recorded_fields, check_stage_groups
from .mentions import find_mentions

TEMPLATES_PATH = Path(__file__).with_name("templates.json")
TASKS = ("phenotype-qa", "phenotype-json", "diagnosis")
PHENOTYPE_TASKS = ("phenotype-qa", "phenotype-json")
# The report cut of datasets built with the defaults (tasks.build --max-report-chars), and so of a checkpoint that
# records no prompt settings.
DEFAULT_MAX_REPORT_CHARS = 2000
# Shorter cuts leave no room for a report's head and its key sentences.
MIN_REPORT_CHARS = 300
# "plain": the templates' text as it is; "chat_template": that text as the user turn of the model's own chat template
# (a chat model such as SmolLM2-Instruct is asked in the format it was instruction-tuned in). A checkpoint records
# its format so that code that cannot render it refuses it rather than asking in the wrong one.
CHAT_FORMATS = ("plain", "chat_template")
SETTINGS_FILE = "prompt_settings.json"

# The final-diagnosis heading: "Diagnosis"/"DIAGNOSIS" (or -es, optionally "Details") ending in '.' or ':', at a
# sentence start, with up to two capitalised words before it that do not make it a frozen-section, operative,
# clinical or other non-final diagnosis. Its section ends at the next known heading (capitalised, at a sentence
# start, ending in '.' or ':'), else at the end of the report.
DIAGNOSIS_HEADING = re.compile(r"(?:^|(?<=[.:;] ))((?:[A-Z][A-Za-z-]* ){0,2})"
                               r"(?:DIAGNOS[IE]S|Diagnos[ie]s)(?: Details)?\s*[:.]")
NOT_FINAL = re.compile(r"frozen|section|\bop\b|operative|clinical|\bfs\b|pre|post|intra|quick|previous|addendum|"
                       r"consult|secondary|\bno\b|days|procedure", re.I)
SECTION_END = re.compile(
    r"(?<=[.:;] )(?:comments?|note|gross(?: description)?|microscopic(?: description)?|"
    r"clinical (?:history|information|data)|patient history|s?ynoptic(?: data| report)?|case synopsis|addendum|"
    r"frozen section(?: diagnosis)?|intraoperative consultation|specimens?(?: received)?|source|procedure|"
    r"snomed codes|electronically signed|reviewed and approved)\s*[:.]", re.I)
# The compact staging summary most TCGA reports carry (OCR sometimes eats the S of SYNOPTIC).
SYNOPTIC = re.compile(r"S?YNOPTIC|CASE SYNOPSIS|Pathologic Stag(?:e|ing)|pTNM")
# A sentence: up to and including its run of '.'/';' and the spaces after (reports are one line).
SENTENCE = re.compile(r"[^.;]*(?:[.;]+|$)\s*")
# Fields whose statements a truncated report keeps first, wherever they are: half of the pN, pM and stage values
# the regular expressions find in a whole report used to fall outside a 1,200-character head-and-key-section cut.
EVIDENCE_FIELDS = ("pT", "pN", "pM", "stage", "grade", "gleason", "ER", "PR", "HER2")


# ---------------------------------------------------------------------------------------------- templates

def check_templates(templates: dict, where) -> dict:
    missing = [f for f in FIELDS if f not in templates.get("questions", {})]
    if missing:
        raise ValueError(f"{where}: no question for field(s) {', '.join(missing)}")
    return templates


def load_templates(path=TEMPLATES_PATH) -> dict:
    path = Path(path)
    return check_templates(json.loads(path.read_text()), path)


# ---------------------------------------------------------------------------------------------- the report cut

def find_diagnosis_section(text: str):
    """(start, end) of the final-diagnosis section, or None. A heading preceded by FINAL wins over others."""
    candidates = [m for m in DIAGNOSIS_HEADING.finditer(text) if not NOT_FINAL.search(m.group(1))]
    if not candidates:
        return None
    heading = next((m for m in candidates if "final" in m.group(1).lower()), candidates[0])
    ends = (m for m in SECTION_END.finditer(text, heading.end()) if m.group(0)[0].isupper())
    end = next(ends, None)
    return heading.start(), end.start() if end else len(text)


def truncate_report(text: str, max_chars, key_start, marker: str):
    """Cut `text` to at most max_chars: its head (a third of the budget), then the sentences that state a staging,
    grade, receptor or Gleason value in a standard form (mentions.py; `EVIDENCE_FIELDS`), then the key
    section's sentences from key_start on (or those after the head) while they fit; kept pieces stay in text order,
    the marker between pieces that are not adjacent. -> (text, truncated, evidence sentences kept)."""
    if max_chars is None or len(text) <= max_chars:
        return text, False, 0
    head = max_chars // 3
    sentences = [(m.start(), m.end()) for m in SENTENCE.finditer(text, head) if m.end() > m.start()]
    evidence = [s for s in sentences if any(find_mentions(f, text[s[0]:s[1]]) for f in EVIDENCE_FIELDS)]

    def cost(span):                          # a marker may precede each piece
        return span[1] - span[0] + len(marker)

    room, chosen = max_chars - head, set()
    for span in evidence:                    # every one that fits, in text order
        if cost(span) <= room:
            chosen.add(span)
            room -= cost(span)
    for span in (s for s in sentences if s not in chosen and s[1] > (key_start or 0)):   # then a contiguous run
        if cost(span) > room:
            break
        chosen.add(span)
        room -= cost(span)
    out, end = [text[:head]], head
    for start, stop in sorted(chosen):
        out += [marker if start != end else "", text[start:stop]]
        end = stop
    return "".join(out), True, len(chosen & set(evidence))


def key_start(text: str, section):
    synoptic = SYNOPTIC.search(text)
    if synoptic:
        return synoptic.start()
    return section[0] if section else None


def task_inputs(text: str, max_chars, templates: dict, stats: Counter) -> dict:
    """The report as each task sees it: whole (phenotype tasks) or without its final diagnosis, both truncated."""
    section = find_diagnosis_section(text)
    stats["diagnosis_section_found"] += section is not None
    without = text[:section[0]].rstrip() + " " + text[section[1]:].lstrip() if section else text
    marker = templates["truncation_marker"]
    phenotype, cut, kept = truncate_report(text, max_chars, key_start(text, section), marker)
    stats["truncated_phenotype"] += cut
    stats["truncated_phenotype_evidence_sentences"] += kept
    diagnosis, cut, kept = truncate_report(without.strip(), max_chars, key_start(without, None), marker)
    stats["truncated_diagnosis"] += cut
    stats["truncated_diagnosis_evidence_sentences"] += kept
    return {"phenotype-qa": phenotype, "phenotype-json": phenotype, "diagnosis": diagnosis}


# ---------------------------------------------------------------------------------------------- prompts and answers

def render_prompt(templates: dict, instruction: str, report: str) -> str:
    return templates["prompt"].format(instruction=instruction, report=report)


def task_prompt(task: str, report: str, templates: dict, field: str = None) -> str:
    """The prompt of `task` (for phenotype-qa: the question about `field`) around an already cut report."""
    if task == "phenotype-qa":
        instruction = templates["questions"][field]
    elif task == "phenotype-json":
        instruction = templates["json_instruction"].format(keys=", ".join(FIELDS))
    elif task == "diagnosis":
        instruction = templates["diagnosis_instruction"]
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return render_prompt(templates, instruction, report)


def no_report_prompt(task: str, templates: dict, field: str = None) -> str:
    """The task's prompt with an empty report: the negative prompt of classifier-free guidance, whose answer is
    what the model says from the instruction alone (its prior over values)."""
    return task_prompt(task, "", templates, field)


def json_answer(fields: dict) -> str:
    return json.dumps({f: fields[f] for f in FIELDS})


def diagnosis_statement(fields: dict, templates: dict) -> str:
    """The one-line diagnosis: histology; site; grade; pTNM; stage; receptors; Gleason (the parts the registry has)."""
    t = templates["diagnosis_statement"]
    parts = [fields["histology"] or fields["cancer_type"]]
    if fields["primary_site"]:
        laterality = (fields["laterality"] or "").lower()
        parts.append(t["site"].format(laterality=laterality, site=fields["primary_site"].lower()).strip())
    parts.append(fields["grade"])
    parts.append(" ".join(t["tnm"].format(value=fields[f]) for f in ("pT", "pN", "pM") if fields[f]))
    parts.append(fields["stage"])
    parts += [t["receptor"].format(name=f, value=fields[f]) for f in ("ER", "PR", "HER2") if fields[f]]
    if fields["gleason"]:
        parts.append(t["gleason"].format(value=fields["gleason"]))
    return t["separator"].join(p for p in parts if p) + t["end"]


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class PromptSettings:
    """How prompts are made: the templates themselves (not a path: an export must not depend on the installed
    package's templates.json), the report cut (characters; None keeps reports whole), the chat format and, for
    "chat_template", the model's Jinja chat template (tokenizer_config.json's chat_template: a copy, for the same
    reason) and, when the datasets recorded them, the fields the registry records per cancer type
    (fields.recorded_by_cancer_type: the JSON answer's schema once it has named the cancer type) and the registry's
    stages per cancer type, T, N and M (fields.stage_groups: the JSON answer's stage, fields.derive_stage)."""
    templates: dict
    max_report_chars: int | None = DEFAULT_MAX_REPORT_CHARS
    chat_format: str = "plain"
    chat_template: str | None = None
    recorded_fields: dict | None = None
    stage_groups: dict | None = None

    def __post_init__(self):
        check_settings(self)

    def prompt(self, task: str, report: str, field: str = None) -> str:
        """The prompt for a whole report, prepared as the datasets were: cut to max_report_chars (for the
        diagnosis without its final-diagnosis section), put into the task's template, then rendered in the chat
        format."""
        if not isinstance(report, str) or not report.strip():
            raise ValueError("report must be a non-empty string")
        cut = task_inputs(report.strip(), self.max_report_chars, self.templates, Counter())[task]
        return self.render(task_prompt(task, cut, self.templates, field))

    def render(self, prompt: str) -> str:
        """A task prompt (the datasets' "prompt") as the model reads it: as it is (plain), or as the one user turn
        of the chat template followed by the assistant's turn opening."""
        if self.chat_format == "plain":
            return prompt
        return render_chat(self.chat_template, prompt)

    def with_cut(self, max_report_chars) -> "PromptSettings":
        return replace(self, max_report_chars=max_report_chars)

    def same_prompts(self, other: "PromptSettings") -> bool:
        """Whether both make the same task prompts (templates and cut): a chat model and the datasets it was
        tuned on differ only in how a prompt is rendered."""
        return (self.templates, self.max_report_chars) == (other.templates, other.max_report_chars)

    def to_json(self) -> dict:
        fields = {"templates": self.templates, "max_report_chars": self.max_report_chars,
                  "chat_format": self.chat_format, "chat_template": self.chat_template,
                  "recorded_fields": self.recorded_fields, "stage_groups": self.stage_groups}
        return {k: v for k, v in fields.items() if v is not None or k == "max_report_chars"}

    def save(self, directory) -> Path:
        path = Path(directory) / SETTINGS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def chat_environment():
    """A sandboxed Jinja environment set up as transformers renders chat templates (trim_blocks, lstrip_blocks,
    loop controls, raise_exception): a template is code from a checkpoint, and must run as its authors tested it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env


def render_chat(template: str, user: str, system: str = None, bos_token: str = "", eos_token: str = "") -> str:
    """`user` (after a `system` message, if given) rendered by `template` with the assistant's turn opened
    (add_generation_prompt). bos_token is empty by default: the tokenizer's encode(bos=True) adds the BOS id itself,
    so a template that writes it would give two."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    return chat_environment().from_string(template).render(messages=messages, add_generation_prompt=True,
                                                           bos_token=bos_token, eos_token=eos_token)


def check_settings(settings: PromptSettings):
    cut = settings.max_report_chars
    if cut is not None and (not isinstance(cut, int) or isinstance(cut, bool) or cut < MIN_REPORT_CHARS):
        raise ValueError(f"max_report_chars={cut!r}: None or an int >= {MIN_REPORT_CHARS} (shorter is too short "
                         "for a report's head and key sentences)")
    if settings.chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={settings.chat_format!r}: this version renders {', '.join(CHAT_FORMATS)}")
    if (settings.chat_format == "chat_template") != isinstance(settings.chat_template, str):
        raise ValueError(f"chat_template must be a Jinja template string exactly when chat_format is "
                         f"'chat_template' (chat_format={settings.chat_format!r}, chat_template "
                         f"{type(settings.chat_template).__name__})")
    if settings.chat_template is not None:
        try:
            render_chat(settings.chat_template, "Left breast, lumpectomy: invasive ductal carcinoma.")
        except Exception as e:      # the template is code from a checkpoint: any failure means it cannot be used
            raise ValueError(f"chat_template does not render a user message ({type(e).__name__}: {e})") from None
    check_templates(settings.templates, "templates")
    if settings.recorded_fields is not None:
        check_recorded_fields(settings.recorded_fields)
    if settings.stage_groups is not None:
        check_stage_groups(settings.stage_groups)


SETTINGS_KEYS = ("templates", "max_report_chars", "chat_format", "chat_template", "recorded_fields", "stage_groups")


def settings_from_json(raw: dict) -> PromptSettings:
    """PromptSettings from a prompt_settings.json object (a file, or a shards manifest's copy); the keys a file
    written before they existed lacks take their old meaning (the default cut, plain)."""
    return PromptSettings(raw["templates"], raw.get("max_report_chars", DEFAULT_MAX_REPORT_CHARS),
                          raw.get("chat_format", "plain"), raw.get("chat_template"), raw.get("recorded_fields"),
                          raw.get("stage_groups"))


def chat_settings(settings: PromptSettings, checkpoint) -> PromptSettings:
    """`settings` rendered in the chat template of the checkpoint directory's tokenizer_config.json: how a chat
    model is asked zero-shot, and how its SFT data is made (prepare --prompt-settings)."""
    path = Path(checkpoint) / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a chat model's directory carries its chat template there)")
    template = json.loads(path.read_text()).get("chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{path}: no chat_template string (a list of named templates is not supported)")
    try:
        return replace(settings, chat_format="chat_template", chat_template=template)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_prompt_settings(directory=None) -> PromptSettings:
    """The settings saved in `directory` (a dataset folder or a checkpoint). Without a prompt_settings.json there
    (or without a directory): the packaged templates.json, the datasets' default cut (DEFAULT_MAX_REPORT_CHARS)
    and the plain format, which is how checkpoints exported before the file existed were trained by default."""
    path = Path(directory) / SETTINGS_FILE if directory is not None else None
    if path is None or not path.is_file():
        return PromptSettings(load_templates())
    return read_prompt_settings(path)


def read_prompt_settings(path) -> PromptSettings:
    """The settings of one prompt_settings.json file, checked; errors name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.keys() - set(SETTINGS_KEYS) or "templates" not in raw:
        got = ", ".join(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: expected an object with keys {', '.join(SETTINGS_KEYS)} (templates required); "
                         f"got {got}")
    try:
        return settings_from_json(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
