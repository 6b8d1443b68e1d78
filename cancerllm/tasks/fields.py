"""The phenotype fields: their order, the registry columns they come from and the value forms they may take.

Categorical fields are closed lists in the registry's own spelling (the JSON task's schema and the counterfactual
edits draw from them); a registry value outside its list is an error at build time, not a silent drop. Free-text
fields (primary site, histology) are any string.
"""
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


def json_schema() -> dict:
    """JSON schema of the phenotype object: every field required, in FIELDS order, null or an allowed value."""
    def value_schema(field):
        if field in ALLOWED:
            return {"anyOf": [{"type": "null"}, {"enum": ALLOWED[field]}]}
        return {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1, "maxLength": FREE_TEXT_MAX_CHARS}]}
    return {"type": "object", "properties": {f: value_schema(f) for f in FIELDS}, "required": list(FIELDS),
            "additionalProperties": False}
