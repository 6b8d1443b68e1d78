"""Generation speed: cancerllm's Generator against transformers' generate on the same weights, in one process.

The `small` preset with random weights (fp32 on CPU), greedy, prompts of 512 tokens, 128 new tokens, at batch 1
and 8. Prefill tokens/s = B * prompt / time of a 1-token generation; decode tokens/s = B / the median gap
between sampling steps of a 128-token generation, stamped by a logits processor in both engines (the median
shrugs off load spikes from other processes on a shared machine). Repetitions alternate the engines and keep
each one's best. Both generate through EOS, and their tokens are checked equal.

Decode is memory bound: each step reads every weight but the embedding table once (plus each row's cached keys
and values), so the bound is B * bandwidth / bytes per step, with the bandwidth of a copy far larger than the
caches (bytes read plus written) measured in this run.

    .venv/bin/python bench/generate.py [--batches 1 8] [--reps 3] [--device cuda --dtype bfloat16] [--tokenizer F]
                                       [--num-beams K]

--num-beams K runs beam search in both engines (transformers' num_beams=K, early_stopping=False, EOS held off to
the last token as ours ignores it): B prompts then decode B * K rows per step, and decode tokens/s counts each
prompt's one new token per step.

The prompts are random token ids: the benchmark measures speed, not text, so the tokenizer (--tokenizer, else
Mistral's from mistral-common) only decodes; without one, token ids stand in for text (TokenIds).

Rows: cancerllm (default: on CPU the model's decoding form, model.fuse_for_decoding, runs each weight shape's
matmul on oneDNN with prepacked weights and fused post-ops or on F.linear, whichever this machine measured faster:
cancerllm/decode_paths.py), cancerllm-onednn and cancerllm-mkl (CPU only: every matmul forced onto one path,
showing what the measured choice buys), transformers. llama.cpp, in each precision: bench/peers.py. What each choice in the generator bought, and the measured ratios, are in
bench/README.md.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_gbps, machine, print_table, write_results   # noqa: E402
from cancerllm import Generator, ModelArgs, Transformer   # noqa: E402
from cancerllm.cache import KVCache   # noqa: E402
from cancerllm.checkpoint import parse_dtype   # noqa: E402
from cancerllm.tokenizer import Tokenizer, mistral_tokenizer_path   # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TokenIds:
    """Stands in for a tokenizer where none is installed (the GPU machine has no mistral-common): the generator
    needs only the vocabulary size and a decode, and prompts given as ids are used as given."""
    bos_id, eos_id, pad_id = 1, 2, -1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def check_fits(self, vocab_size: int, what: str = "model"):
        if self.vocab_size > vocab_size:
            raise ValueError(f"TokenIds: {self.vocab_size} ids do not fit the {what}'s vocab_size={vocab_size}")

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def load_tokenizer(path, vocab_size: int):
    """Tokenizer(path) when given, else Mistral's from mistral-common; TokenIds (and a line saying why) when there
    is none or its vocabulary is larger than the model's (the `tiny` preset's)."""
    try:
        tokenizer = Tokenizer(path or mistral_tokenizer_path())
    except FileNotFoundError as e:
        print(f"generate bench: no tokenizer ({e}); token ids stand in for text")
        return TokenIds(vocab_size)
    if tokenizer.vocab_size > vocab_size:
        print(f"generate bench: {tokenizer.path} has {tokenizer.vocab_size} pieces, the model {vocab_size}; "
              "token ids stand in for text")
        return TokenIds(vocab_size)
    return tokenizer


def hf_twin(model: Transformer):
    """transformers' MistralForCausalLM holding our model's weights (same names, plus the "model." prefix)."""
    import transformers
    a = model.args
    config = transformers.MistralConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        sliding_window=a.sliding_window, max_position_embeddings=a.max_seq_len, rope_theta=a.rope_theta,
        rms_norm_eps=a.norm_eps, tie_word_embeddings=False)
    weight = model.lm_head.weight
    hf = transformers.MistralForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    hf.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                        for k, v in model.state_dict().items()})
    hf.generation_config.eos_token_id = None     # generate through EOS, like ignore_eos=True on our side
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


class StepClock:
    """Stamps the time at each sampling step, as our logits processor (mask) and as transformers' (__call__):
    the median gap between stamps is one decode step, robust to load spikes from other processes."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def reset(self, batch_size):
        self.stamps = []

    def mask(self, logits, rows):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def advance(self, row, token_id):
        """The clock keeps no per-row state."""

    def reorder(self, rows, sources):
        """Nor per-beam state."""

    def __call__(self, input_ids, scores):
        self.mask(scores, None)
        return scores

    def median_step_s(self) -> float:
        gaps = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        return gaps[len(gaps) // 2]


def ours(gen: Generator, prompts, clock, num_beams=1):
    """A function of max_new_tokens returning the new token ids of every row."""
    def run(n):
        clock.reset(len(prompts))
        results = gen.generate(prompts, max_new_tokens=n, ignore_eos=True, logits_processor=clock,
                               num_beams=num_beams)
        return [r.token_ids for r in results]
    return run


def theirs(hf, prompts, device, clock, num_beams=1):
    from transformers import LogitsProcessorList
    ids = torch.tensor(prompts, device=device)
    beams = {"num_beams": num_beams, "early_stopping": False} if num_beams > 1 else {}

    def run(n):
        clock.reset(len(prompts))
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, logits_processor=LogitsProcessorList([clock]), **beams)
        return out[:, ids.shape[1]:].tolist()
    return run


def measure(runs: dict, clocks: dict, new_tokens: int, reps: int, device):
    """Per engine: the best prefill time (a 1-token generation), the best median decode step, the output of a
    full generation and the peak GPU memory; repetitions alternate the engines."""
    prefill_s = {name: float("inf") for name in runs}
    step_s = dict(prefill_s)
    outputs, peak_mib = {}, {}
    for run in runs.values():   # warm up: first calls allocate and pick kernels
        run(2)
    for _ in range(reps):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t1, _ = timed(lambda: run(1), device)
            prefill_s[name] = min(prefill_s[name], t1)
            outputs[name] = run(new_tokens)
            step_s[name] = min(step_s[name], clocks[name].median_step_s())
            if device.type == "cuda":
                peak_mib[name] = torch.cuda.max_memory_allocated() / 2 ** 20
    return prefill_s, step_s, outputs, peak_mib


def decode_benchmark(preset: str, batches, prompt_len: int, new_tokens: int, reps: int, device, dtype,
                     tokenizer_path=None, peers: bool = True, bandwidth_gbps=None,
                     num_beams: int = 1) -> tuple[list, dict]:
    """Rows (one per batch size and engine) and the facts they rest on: prefill and decode tokens/s, ratios to
    transformers (with `peers`) and to the bandwidth bound (`bandwidth_gbps`: measured here when None; of
    batch * num_beams rows), whether the engines' tokens agree."""
    torch.manual_seed(0)
    args = ModelArgs.preset(preset)
    model = Transformer(args).to(device=device, dtype=dtype).eval()
    model.init_rope()
    tokenizer = load_tokenizer(tokenizer_path, args.vocab_size)
    gens = {"cancerllm": Generator(model, tokenizer)}
    if device.type == "cpu":   # the measured choice (the default) against each path forced for every weight
        gens["cancerllm-onednn"] = Generator(model, tokenizer, onednn=True)
        gens["cancerllm-mkl"] = Generator(model, tokenizer, onednn=False)
    hf = hf_twin(model) if peers else None

    bandwidth = bandwidth_gbps or copy_gbps(device, mib=512)
    weight_bytes = args.num_params(embedding=False) * dtype.itemsize
    cache_bpt = KVCache.for_model(args, 1, 1, dtype=dtype, device="meta").bytes_per_token
    mean_context = min(prompt_len + new_tokens // 2, args.sliding_window or 1 << 62)
    rows = []
    for batch in batches:
        prompts = torch.randint(3, args.vocab_size, (batch, prompt_len)).tolist()
        clocks = {name: StepClock(device) for name in [*gens, "transformers"]}
        runs = {name: ours(gen, prompts, clocks[name], num_beams) for name, gen in gens.items()}
        if hf is not None:
            runs["transformers"] = theirs(hf, prompts, device, clocks["transformers"], num_beams)
        prefill_s, step_s, outputs, peak_mib = measure(runs, clocks, new_tokens, reps, device)
        step_bytes = weight_bytes + batch * num_beams * mean_context * cache_bpt
        bound = batch * bandwidth * 1e9 / step_bytes
        for name in runs:
            decode = batch / step_s[name]
            rows.append({
                "batch": batch, "engine": name,
                "prefill_tok_s": batch * prompt_len / prefill_s[name],
                "decode_tok_s": decode,
                "decode_vs_transformers": step_s["transformers"] / step_s[name] if hf else None,
                "prefill_vs_transformers": prefill_s["transformers"] / prefill_s[name] if hf else None,
                "decode_bound_tok_s": bound,
                "decode_vs_bound": decode / bound,
                "outputs_equal": outputs[name] == outputs["transformers"] if hf else None,
                "peak_gpu_mib": peak_mib.get(name),
            })
    facts = {"read_bandwidth_gbps": bandwidth, "weight_bytes": weight_bytes, "kv_cache_bytes_per_token": cache_bpt,
             "sliding_window": args.sliding_window, "tokenizer": type(tokenizer).__name__}
    return rows, facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokenizer", help="a sentencepiece tokenizer.model (default: Mistral's, if installed)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search in both engines (1: greedy)")
    opts = parser.parse_args()
    device, dtype = torch.device(opts.device), parse_dtype(opts.dtype)
    rows, facts = decode_benchmark(opts.preset, opts.batches, opts.prompt_len, opts.new_tokens, opts.reps, device,
                                   dtype, opts.tokenizer, num_beams=opts.num_beams)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = machine()
    cache_bpt, window = facts["kv_cache_bytes_per_token"], facts["sliding_window"]
    print(f"generate bench: preset {opts.preset} {opts.dtype} on {opts.device}, prompt {opts.prompt_len}, "
          f"{opts.new_tokens} new tokens, " + (f"{opts.num_beams} beams" if opts.num_beams > 1 else "greedy")
          + f"; {info['cpu']} x{info['cores']}, torch {info['torch']}")
    print(f"copy bandwidth {facts['read_bandwidth_gbps']:.1f} GB/s; weights read per decode step "
          f"{facts['weight_bytes'] / 1e6:.1f} MB; KV cache {cache_bpt} B/token "
          f"({cache_bpt * min(window or 1 << 62, 640) / 2 ** 20:.2f} MiB per row at 640 tokens, flat past the "
          f"{window}-token window); process peak RSS {peak_rss_mib:.0f} MiB (both engines)")
    columns = ["batch", "engine", "prefill_tok_s", "decode_tok_s", "decode_vs_transformers",
               "prefill_vs_transformers", "decode_vs_bound", "outputs_equal"]
    print_table(rows, columns + (["peak_gpu_mib"] if device.type == "cuda" else []))
    path = write_results("generate", rows, preset=opts.preset, dtype=opts.dtype, device=opts.device,
                         prompt_len=opts.prompt_len, new_tokens=opts.new_tokens, num_beams=opts.num_beams,
                         peak_rss_mib=peak_rss_mib, **facts)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
