"""Baselines for phenotype extraction: the majority value per field, and a regular-expression extractor for the
fields pathology reports state in a standard way (their patterns: mentions.py).
"""
from collections import Counter

from .fields import FIELDS, normalize_value
from .mentions import find_mentions

REGEX_FIELDS = ("laterality", "grade", "pT", "pN", "pM", "stage", "ER", "PR", "HER2", "gleason")


def regex_extract(text: str) -> dict:
    """{field: value or None} for every field: the first mention, or for laterality the most frequent side."""
    out = {f: None for f in FIELDS}
    for field in REGEX_FIELDS:
        mentions = find_mentions(field, text)
        if not mentions:
            continue
        if field == "laterality":
            sides = Counter(m.value for m in mentions)
            out[field] = "Bilateral" if "Bilateral" in sides else sides.most_common(1)[0][0]
        else:
            out[field] = mentions[0].value
    return out


def majority_values(train_fields) -> dict:
    """The most frequent non-null value of each field over the training records ({field: value}); a field with no
    value in training predicts null. Ties go to the value seen first."""
    out = {}
    for f in FIELDS:
        counts = Counter(r[f] for r in train_fields if normalize_value(f, r[f]) is not None)
        out[f] = counts.most_common(1)[0][0] if counts else None
    return out
