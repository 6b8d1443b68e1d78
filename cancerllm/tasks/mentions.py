"""How reports state the fields they state in a standard way (pT/pN/pM, stage, grade, laterality, Gleason, ER/PR/HER2):
one or more patterns per field, and `find_mentions`, every statement of a field in a text.

Each pattern captures the value's own text (group `v`), with the surface forms that slot can take (a fixed
vocabulary, or for Gleason the same shape with other numbers), so the counterfactual perturbation (perturb.py) can
rewrite a stated value in place and know the new gold. The regular-expression baseline reads its answers with
them, and the report cut keeps the sentences they find.
"""
import re
from dataclasses import dataclass

from .fields import PATTERN_SUM, normalize_gleason

RECEPTOR_WORDS = ["positive", "negative"]
GLEASON_PATTERNS = {6: (3, 3), 7: (3, 4), 8: (4, 4), 9: (4, 5), 10: (5, 5)}   # score -> (primary, secondary)
# Between a receptor's name and its result: a few words, no sentence or clause break.
GAP = r"[^.;]{0,40}?"


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern
    canonical: callable           # the `v` group's text -> the field's value in registry spelling
    vocabulary: tuple = ()        # surface forms the `v` slot can be rewritten to (empty: not editable)
    respell: callable = None      # or: a stated surface -> the forms it can be rewritten to, each in its shape

    def spellings(self, surface: str) -> tuple:
        return self.respell(surface) if self.respell else self.vocabulary


@dataclass(frozen=True)
class Mention:
    field: str
    start: int                    # span of the value's own text
    end: int
    surface: str                  # the value's own text
    value: str                    # registry spelling
    pattern: Pattern


def _tnm(letter, vocabulary):
    # pT needs its p; pN and pM may instead follow the previous category directly ("pT2 N0 MX", "pT2N0").
    after_category = r"(?:(?<=[TN][0-4X])|(?<=[TN][0-4][a-d])|(?<=Tis)|(?<=\)))\s?"
    lead = r"\b[yr]?[pP]" if letter == "T" else rf"(?:\b[yr]?[pP]|{after_category})"
    tail = r"(?:is|[0-4X])(?:mi|[a-d])?\d?" if letter == "T" else r"[0-3X](?:mi|[a-c])?"
    return Pattern(re.compile(lead + rf"(?P<v>{letter}{tail})(?![a-z0-9])"), lambda v: v, tuple(vocabulary))


def _receptor(names):
    return Pattern(re.compile(rf"(?:{names}){GAP}\b(?P<v>positive|negative|equivocal)\b", re.I),
                   lambda v: v.capitalize(), tuple(RECEPTOR_WORDS))


def _gleason_spellings(surface: str) -> tuple:
    """A stated Gleason value rewritten to each score 6-10 in its own shape: "4 + 5 = 9", "5+4 (9)", "3+4",
    "7 (3+4)", "8" (the patterns and the sum always agree)."""
    sum_last = PATTERN_SUM.match(surface)
    out = []
    for score, (primary, secondary) in GLEASON_PATTERNS.items():
        numbers = iter(map(str, (primary, secondary, score) if sum_last else (score, primary, secondary)))
        out.append(re.sub(r"\d+", lambda _: next(numbers), surface))
    return tuple(out)


PATTERNS = {
    "pT": [_tnm("T", ["T1", "T1a", "T1b", "T2", "T2a", "T2b", "T3", "T3a", "T3b", "T4", "T4a"])],
    "pN": [_tnm("N", ["N0", "N1", "N1a", "N2", "N2a", "N3"])],
    "pM": [_tnm("M", ["M0", "M1", "MX"])],
    "stage": [Pattern(re.compile(r"\b[Ss]tage(?: [Gg]roup(?:ing)?)?:?\s*(?P<v>(?:IV|I{1,3})[ABC]?)\b"),
                      lambda v: "Stage " + v, ("I", "IA", "IB", "II", "IIA", "IIB", "III", "IIIA", "IIIB", "IV"))],
    "grade": [
        Pattern(re.compile(r"\bG(?P<v>[1-4])\b"), lambda v: "G" + v, ("1", "2", "3")),
        Pattern(re.compile(r"(?<!Gleason )\b[Gg]rade:?\s*(?P<v>[1-4])\b"), lambda v: "G" + v, ("1", "2", "3")),
        Pattern(re.compile(r"\b(?P<v>well|moderately|poorly)[ -]differentiated", re.I),
                lambda v: {"well": "G1", "moderately": "G2", "poorly": "G3"}[v.lower()],
                ("well", "moderately", "poorly")),
        Pattern(re.compile(r"\b(?P<v>high|low)[ -]grade\b", re.I), lambda v: v.capitalize() + " Grade",
                ("high", "low")),
    ],
    "laterality": [Pattern(re.compile(r"\b(?P<v>left|right|bilateral)\b", re.I), lambda v: v.capitalize(),
                           ("left", "right"))],
    "ER": [_receptor(r"estrogen receptors?|\bER\b")],
    "PR": [_receptor(r"progesterone receptors?|\bPR\b")],
    "HER2": [_receptor(r"\bHER-?2(?:/neu)?|c-?erb-?B-?2")],
    # "3+4=7", "4+5 (9)", "3+4", "7 (4+3)" or a bare score 6-10 ("Gleason grade 4" names a pattern, not a score).
    "gleason": [Pattern(re.compile(r"Gleason(?: score| grade| sum)?:?\s*(?P<v>\d\s*\+\s*\d(?:\s*=\s*\d+|\s*\(\d+\))?"
                                   r"|(?:10|[6-9])(?!\d)(?:\s*\(\d\s*\+\s*\d\))?)", re.I), normalize_gleason,
                        respell=_gleason_spellings)],
}


def find_mentions(field: str, text: str) -> list[Mention]:
    """Every statement of `field` in the text, in text order."""
    found = []
    for pattern in PATTERNS[field]:
        for m in pattern.regex.finditer(text):
            found.append(Mention(field, m.start("v"), m.end("v"), m.group("v"), pattern.canonical(m.group("v")),
                                 pattern))
    return sorted(found, key=lambda m: m.start)
