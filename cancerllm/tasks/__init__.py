"""The two CancerLLM tasks built from the bundled TCGA data: phenotype extraction (as question answering and as one
JSON object) and diagnosis generation; their datasets, metrics, baselines, perturbations and constrained decoding."""
