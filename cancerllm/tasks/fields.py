"""The phenotype fields: their order, the registry columns they come from and the value forms they may take.

Categorical fields are closed lists in the registry's own spelling (the JSON task's schema and the counterfactual
edits draw from them); a registry value outside its list is an error at build time, not a silent drop. Free-text
fields (primary site, histology) are any string.

`normalize_value` maps the many ways a value is written ("pT2a" ~ "T2a", "Stage IIA" ~ "stage 2A", "G2" ~
"moderately differentiated") to one canonical form, which scoring, the majority baseline and the counterfactual
edits all compare.
"""
import functools
import re
import string
from collections import Counter, defaultdict

FIELDS = ("cancer_type", "primary_site", "histology", "laterality", "grade", "pT", "pN", "pM", "stage",
          "ER", "PR", "HER2", "gleason")

# TCGA study code -> study name, the `cancer_type` answer.
CANCER_TYPES = {
    "ACC": "Adrenocortical carcinoma", "BLCA": "Bladder urothelial carcinoma", "BRCA": "Breast invasive carcinoma",
    "CESC": "Cervical squamous cell carcinoma and endocervical adenocarcinoma", "CHOL": "Cholangiocarcinoma",
    "COAD": "Colon adenocarcinoma", "ESCA": "Esophageal carcinoma", "HNSC": "Head and neck squamous cell carcinoma",
    "KICH": "Kidney chromophobe", "KIRC": "Kidney renal clear cell carcinoma",
    "KIRP": "Kidney renal papillary cell carcinoma", "LIHC": "Liver hepatocellular carcinoma",
    "LUAD": "Lung adenocarcinoma", "LUSC": "Lung squamous cell carcinoma", "MESO": "Mesothelioma",
    "PAAD": "Pancreatic adenocarcinoma", "PRAD": "Prostate adenocarcinoma", "READ": "Rectum adenocarcinoma",
    "SKCM": "Skin cutaneous melanoma", "STAD": "Stomach adenocarcinoma", "TGCT": "Testicular germ cell tumors",
    "THCA": "Thyroid carcinoma", "UVM": "Uveal melanoma",
}

_ROMAN = ["0", "I", "IA", "IB", "IC", "II", "IIA", "IIB", "IIC", "III", "IIIA", "IIIB", "IIIC", "IV", "IVA", "IVB",
          "IVC", "IS", "X"]
_RECEPTOR = ["Positive", "Negative", "Indeterminate"]

ALLOWED = {
    "cancer_type": list(CANCER_TYPES.values()),
    "laterality": ["Left", "Right", "Bilateral", "Left lobe", "Right lobe", "Midline", "Isthmus"],
    "grade": ["G1", "G2", "G3", "G4", "GX", "Low Grade", "High Grade"],
    "pT": ["TX", "T0", "Tis", "T1", "T1mi", "T1a", "T1a1", "T1a2", "T1b", "T1b1", "T1b2", "T1c", "T2", "T2a",
           "T2a1", "T2a2", "T2b", "T2c", "T3", "T3a", "T3b", "T3c", "T4", "T4a", "T4b", "T4c", "T4d", "T4e"],
    "pN": ["NX", "N0", "N0 (i-)", "N0 (i+)", "N0 (mol-)", "N0 (mol+)", "N1", "N1mi", "N1a", "N1b", "N1c", "N2",
           "N2a", "N2b", "N2c", "N3", "N3a", "N3b", "N3c"],
    "pM": ["MX", "M0", "cM0 (i+)", "M1", "M1a", "M1b", "M1c"],
    "stage": ["Stage " + s for s in _ROMAN],
    "ER": _RECEPTOR,
    "PR": _RECEPTOR,
    "HER2": _RECEPTOR + ["Equivocal"],
    "gleason": [str(s) for s in range(2, 11)],
}
FREE_TEXT_MAX_CHARS = 120


def check_value(field: str, value: str, where: str):
    """Raise if a registry value is not one of its field's allowed forms; `where` names the file, line and column."""
    if field not in FIELDS:
        raise ValueError(f"{where}: unknown phenotype field {field!r}; known: {', '.join(FIELDS)}")
    if field in ALLOWED and value not in ALLOWED[field]:
        raise ValueError(f"{where}: {value!r} is not an allowed {field} value ({', '.join(ALLOWED[field])})")
    if len(value) > FREE_TEXT_MAX_CHARS:
        raise ValueError(f"{where}: {field} value longer than {FREE_TEXT_MAX_CHARS} characters")


def value_schema(field: str) -> dict:
    """A stated value of `field`: one of its allowed values, or a free-text string."""
    if field in ALLOWED:
        return {"enum": ALLOWED[field]}
    # A pattern rather than minLength/maxLength: xgrammar compiles a length-bounded string to a character class
    # that admits raw control characters, which JSON forbids in strings (the answer would not parse).
    text = r'^[^"\\\x00-\x1f]{1,%d}$' % FREE_TEXT_MAX_CHARS      # no quote, backslash or control character
    return {"type": "string", "pattern": text}


def object_schema(field_schemas: dict) -> dict:
    return {"type": "object", "properties": field_schemas, "required": list(FIELDS), "additionalProperties": False}


def json_schema(recorded_fields: dict = None) -> dict:
    """JSON schema of the phenotype object: every field required, in FIELDS order, null or an allowed value.

    recorded_fields ({cancer type: {field: "required" | "optional"}}, `recorded_by_cancer_type`): the object of a
    listed cancer type holds a value for its required fields, null or a value for its optional ones and null for
    the rest, as the registry records them; a cancer type not listed, or none, leaves every field open."""
    open_fields = {f: {"anyOf": [{"type": "null"}, value_schema(f)]} for f in FIELDS}
    if not recorded_fields:
        return object_schema(open_fields)
    check_recorded_fields(recorded_fields)
    nulls = {f: {"type": "null"} for f in FIELDS}
    by_type = [object_schema({**nulls, **{f: value_schema(f) if how == "required" else open_fields[f]
                                          for f, how in recorded.items()}, "cancer_type": {"const": cancer_type}})
               for cancer_type, recorded in recorded_fields.items()]
    unlisted = [t for t in ALLOWED["cancer_type"] if t not in recorded_fields]
    rest = {"anyOf": [{"type": "null"}, *([{"enum": unlisted}] if unlisted else [])]}
    return {"anyOf": [*by_type, object_schema({**open_fields, "cancer_type": rest})]}


RECORDED = ("required", "optional")


def recorded_by_cancer_type(labels, required_share: float = 0.95) -> dict:
    """{cancer type: {field: "required" | "optional"}} from registry labels ({field: value or None} per patient,
    the training split's): the fields the registry records for each cancer type, "required" where at least
    `required_share` of that type's patients have a value. Registries record a field for some cancer types only
    (receptors for breast, Gleason for prostate, grade for neither), so a field never recorded for a type is null
    in every answer of that type. Patients without a cancer type are left out."""
    if isinstance(required_share, bool) or not isinstance(required_share, (int, float)) or not 0 < required_share <= 1:
        raise ValueError(f"required_share={required_share!r}: a share of a cancer type's patients, > 0 and <= 1")
    patients, stated = Counter(), defaultdict(Counter)
    for fields in labels:
        cancer_type = fields.get("cancer_type")
        if cancer_type is None:
            continue
        patients[cancer_type] += 1
        stated[cancer_type].update(f for f in FIELDS if f != "cancer_type" and fields.get(f) is not None)
    return {t: {f: "required" if stated[t][f] >= required_share * n else "optional"
                for f in FIELDS if stated[t][f]}
            for t, n in sorted(patients.items())}


def per_cancer_type(mapping, where: str, inner: str):
    """(cancer type, its object) of a {cancer type: {...}} mapping, each checked: a JSON object keyed by allowed
    cancer types whose values are objects (`inner` describes them in the error)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected an object {{cancer type: {inner}}}, got {type(mapping).__name__}")
    for cancer_type, by_type in mapping.items():
        if cancer_type not in ALLOWED["cancer_type"]:
            raise ValueError(f"{where}: unknown cancer type {cancer_type!r}")
        if not isinstance(by_type, dict):
            raise ValueError(f"{where}[{cancer_type!r}]: expected an object {inner}")
        yield cancer_type, by_type


def check_recorded_fields(recorded_fields, where: str = "recorded_fields"):
    """Raise unless `recorded_fields` maps allowed cancer types to {field: "required" | "optional"}."""
    for cancer_type, recorded in per_cancer_type(recorded_fields, where, "{field: required|optional}"):
        for field, how in recorded.items():
            if field not in FIELDS or field == "cancer_type":
                raise ValueError(f"{where}[{cancer_type!r}]: unknown field {field!r}")
            if how not in RECORDED:
                raise ValueError(f"{where}[{cancer_type!r}][{field!r}]: {how!r}, expected one of {RECORDED}")


STAGE_FROM = ("pT", "pN", "pM")   # what a stage group is keyed by, after the cancer type


def stage_key(fields: dict) -> str:
    """'t2|n0|m0' (normalised, so that 'pT2', 'N0 (i-)' and 'N0' meet; empty where null): the T, N and M a stage
    group is keyed by."""
    return "|".join(normalize_value(f, fields.get(f)) or "" for f in STAGE_FROM)


def stage_order(stage):
    return (stage is None, ALLOWED["stage"].index(stage) if stage is not None else 0)


def stage_groups(labels) -> dict:
    """{cancer type: {stage_key: [stages]}} from registry labels (the training split's): for each cancer type and
    combination of pathologic T, N and M (nulls included) the stages its patients have most often (every one of a
    tie, in stage order; null counts as a stage: types whose registry leaves it empty). A registry derives the stage
    from T, N and M by the AJCC tables of the cancer type and edition; a model that has seen a few hundred answers
    reads T, N and M from a report far better than it learns those tables, so the answer's stage is looked up from
    its own T, N and M (derive_stage). Patients without a cancer type are left out."""
    counts = defaultdict(Counter)
    for fields in labels:
        if fields.get("cancer_type") is not None:
            counts[fields["cancer_type"], stage_key(fields)][fields.get("stage")] += 1
    groups = defaultdict(dict)
    for (cancer_type, key), stages in sorted(counts.items()):
        top = max(stages.values())
        groups[cancer_type][key] = sorted((s for s, n in stages.items() if n == top), key=stage_order)
    return dict(groups)


def check_stage_groups(groups, where: str = "stage_groups"):
    """Raise unless `groups` maps allowed cancer types to {stage_key of allowed values: [stages or null]}."""
    for cancer_type, by_key in per_cancer_type(groups, where, "{'t|n|m': [stages]}"):
        for key, stages in by_key.items():
            parts = key.split("|") if isinstance(key, str) else []
            if len(parts) != len(STAGE_FROM) or any(v and v not in normalized_allowed(f)
                                                    for f, v in zip(STAGE_FROM, parts)):
                raise ValueError(f"{where}[{cancer_type!r}]: {key!r} is not 't|n|m' of allowed values, normalised "
                                 "(or empty)")
            if (not isinstance(stages, list) or not stages
                    or any(s is not None and s not in ALLOWED["stage"] for s in stages)):
                raise ValueError(f"{where}[{cancer_type!r}][{key!r}]: expected a non-empty list of allowed stages "
                                 f"or null, got {stages!r}")


@functools.cache
def normalized_allowed(field: str) -> frozenset:
    return frozenset(normalize_value(field, v) for v in ALLOWED[field])


def derive_stage(fields: dict, groups: dict) -> dict:
    """The answer with its stage looked up from its cancer type, T, N and M (stage_groups): kept where it is one of
    the group's stages or the registry has no patient in that group, else the group's first stage."""
    stages = groups.get(fields.get("cancer_type"), {}).get(stage_key(fields))
    if not stages or normalize_value("stage", fields.get("stage")) in {normalize_value("stage", s) for s in stages}:
        return fields
    return {**fields, "stage": stages[0]}


# ---------------------------------------------------------------------------------------------- normalisation

NULL_ANSWERS = {"", "not mentioned", "null", "none"}
_punctuation = str.maketrans({c: " " for c in string.punctuation})


@functools.cache
def porter_stemmer():
    """nltk's Porter stemmer, imported on first use: only scoring and normalisation need nltk (the `tasks` extra),
    not the generator or the training config, which import this module for the field list."""
    try:
        from nltk.stem.porter import PorterStemmer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("normalising free-text values needs nltk, from the `tasks` extra: "
                                  "pip install 'cancerllm[tasks]'") from e
    return PorterStemmer()


@functools.lru_cache(maxsize=2**17)
def stem(word: str) -> str:
    """The Porter stem of a word, memoised: an evaluation stems the same few thousand words tens of thousands of
    times (half the scoring time before)."""
    return porter_stemmer().stem(word)


def exact_tokens(text: str) -> list[str]:
    """Lower-cased, punctuation removed, Porter-stemmed tokens: the study's exact match, and free-text values'
    canonical form."""
    return [stem(w) for w in text.lower().translate(_punctuation).split()]


ROMAN = {"1": "i", "2": "ii", "3": "iii", "4": "iv"}
GRADE_WORDS = (("undifferentiated", "g4"), ("poorly", "g3"), ("moderately", "g2"), ("well", "g1"),
               ("high", "high"), ("low", "low"))
GRADE_NUMBERS = {"1": "g1", "i": "g1", "2": "g2", "ii": "g2", "3": "g3", "iii": "g3", "4": "g4", "iv": "g4",
                 "x": "gx"}
CANCER_NAMES = {name.lower(): code for code, name in CANCER_TYPES.items()}
PATTERN_SUM = re.compile(r"\D*?\d+\s*\+\s*\d+")   # a Gleason value that opens with "primary + secondary"


def normalize_tnm(field: str, value: str) -> str:
    """'pT2a', 'T2a', 'ypT2a', '2a' -> 't2a'; qualifiers in parentheses ('N0 (i-)') are dropped."""
    s = re.sub(r"\(.*?\)", "", value.lower()).replace(" ", "")
    s = re.sub(r"^[yra]?[pc]?(?=[tnm])", "", s)
    letter = field[1].lower()
    return s if s.startswith(letter) else letter + s


def normalize_stage(value: str) -> str:
    """'Stage IIA', 'stage 2a', 'IIA' -> 'iia'."""
    s = re.sub(r"\b(ajcc|pathologic|stage)\b", "", value.lower()).replace(" ", "")
    return re.sub(r"^[1-4]", lambda m: ROMAN[m.group(0)], s)


def normalize_grade(value: str) -> str:
    """'G2', 'Grade 2', 'grade II', 'moderately differentiated' -> 'g2'; 'High Grade' -> 'high'."""
    s = value.lower()
    for word, grade in GRADE_WORDS:
        if word in s:
            return grade
    s = re.sub(r"\b(histologic|grade)\b", "", s).replace(" ", "")
    return GRADE_NUMBERS.get(s.removeprefix("g"), s)


def normalize_receptor(value: str) -> str:
    s = value.lower()
    for word, status in (("equivocal", "equivocal"), ("indeterminate", "indeterminate"), ("neg", "negative"),
                         ("pos", "positive")):
        if word in s:
            return status
    return {"+": "positive", "-": "negative"}.get(s.strip(), s.strip())


def normalize_gleason(value: str) -> str:
    """'3+4=7', '4+3 (7)', '3 + 4', '7 (4+3)', 'Gleason score 7' -> '7': a stated sum wins over the patterns."""
    numbers = [int(n) for n in re.findall(r"\d+", value)]
    if PATTERN_SUM.match(value):                     # "a+b", then maybe the sum ("= s", "(s)")
        return str(numbers[2] if len(numbers) > 2 else numbers[0] + numbers[1])
    return str(numbers[0]) if numbers else value.lower().strip()


def normalize_laterality(value: str) -> str:
    s = value.lower()
    for side in ("bilateral", "left", "right", "midline", "isthmus"):
        if side in s:
            return side
    return s.strip()


def normalize_value(field: str, value):
    """A field's value in canonical form, or None for no value ("not mentioned", null, empty)."""
    return None if value is None else normalize_text(field, str(value))


@functools.lru_cache(maxsize=2**17)
def normalize_text(field: str, value: str):
    """normalize_value of a value's text, memoised: scoring and abstention's calibration normalise the same few
    hundred values hundreds of thousands of times."""
    if value.strip().lower() in NULL_ANSWERS:
        return None
    value = value.strip()
    if field in ("pT", "pN", "pM"):
        return normalize_tnm(field, value)
    if field == "stage":
        return normalize_stage(value)
    if field == "grade":
        return normalize_grade(value)
    if field in ("ER", "PR", "HER2"):
        return normalize_receptor(value)
    if field == "gleason":
        return normalize_gleason(value)
    if field == "laterality":
        return normalize_laterality(value)
    if field == "cancer_type":
        value = CANCER_NAMES.get(value.lower(), value.upper() if value.upper() in CANCER_TYPES else value)
    return " ".join(exact_tokens(value))
