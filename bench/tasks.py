"""Cost of schema-constrained JSON decoding (cancerllm/tasks/constrained.py).

Two measurements, on Mistral's 32k vocabulary:
- the processor alone: milliseconds per decode step (mask of a [B, 32000] fp32 logits tensor + advance of B rows);
- end to end: generated tokens/s of cancerllm.Generator with and without the processor, on a random model of the
  given preset (the constrained run stops when the object closes; the free run is given the same token budget
  and ignores EOS, so both decode the same number of steps per row).

    python bench/tasks.py [--preset tiny] [--batch-sizes 1,8]

Prints the table and writes bench/results/tasks-<time>.json.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import print_table, write_results  # noqa: E402

from cancerllm import ModelArgs, Transformer  # noqa: E402
from cancerllm.generate import Generator  # noqa: E402
from cancerllm.tasks.constrained import JsonSchemaProcessor  # noqa: E402
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path  # noqa: E402

PROMPT = "### Instruction:\nExtract the cancer phenotypes as JSON.\n\n### Input:\nLeft breast, pT2 N0.\n\n### Response:\n"


def processor_step_ms(proc, batch: int, steps: int = 50) -> float:
    """Mean ms per step of mask + advance, walking random allowed tokens (restarting rows whose object closed)."""
    proc.reset(batch)
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(steps):
        logits = torch.randn(batch, proc.vocab_size, generator=g)
        start = time.perf_counter()
        proc.mask(logits, list(range(batch)))
        tokens = logits.argmax(-1).tolist()
        for row, token in enumerate(tokens):
            proc.advance(row, token)
        total += time.perf_counter() - start
        if any(m.is_terminated() for m in proc.matchers):
            proc.reset(batch)
    return 1e3 * total / steps


def tokens_per_s(gen, batch: int, processor, max_new_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    results = gen.generate([PROMPT] * batch, max_new_tokens=max_new_tokens, temperature=1.0, seed=0,
                           logits_processor=processor, ignore_eos=processor is None)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / seconds, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-sizes", default="1,8")
    a = p.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer(mistral_tokenizer_path())
    model = Transformer(ModelArgs.preset(a.preset, vocab_size=tok.vocab_size))
    model.init_weights()
    gen = Generator(model, tok)
    start = time.perf_counter()
    proc = JsonSchemaProcessor(tok, vocab_size=model.args.vocab_size)
    build_s = time.perf_counter() - start
    rows = []
    for batch in map(int, a.batch_sizes.split(",")):
        constrained, n = tokens_per_s(gen, batch, proc, 400)
        free, _ = tokens_per_s(gen, batch, None, max(n // batch, 1))
        rows.append({"preset": a.preset, "batch": batch, "processor ms/step": processor_step_ms(proc, batch),
                     "free tok/s": free, "constrained tok/s": constrained, "constrained/free": constrained / free})
    print(f"processor build (vocabulary index + grammar compile): {build_s:.2f} s")
    print_table(rows, list(rows[0]))
    print(f"wrote {write_results('tasks', rows, processor_build_s=build_s)}")


if __name__ == "__main__":
    main()
