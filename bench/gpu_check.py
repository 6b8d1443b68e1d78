"""The one-call GPU check: every kernel's correctness, speed against its peers, a training step and decoding, then
the compiled kernel tests, on a lent H200 (bench/gpu.sh runs it there) inside a time budget.

The device call, after `make gpu-carry` here (it stages Liger-Kernel's wheel and Mistral's tokenizer file, which
the GPU machine lacks, into .gpu-carry/):

    run(command="bash bench/gpu.sh", carry=[".gpu-carry"], timeout_s=540)

Sections, in order: env (versions, measured bf16 matmul TF/s and copy GB/s), correctness (every kernel on CUDA
against float64 at real shapes, errors recorded per case), attention (fwd and bwd TF/s against SDPA's flash and
cuDNN kernels), memory_bound (RMSNorm, cross-entropy, fused linear CE against Liger), train (a training step of
`1b` and of 4 layers at 7B width, with and without activation checkpointing), decode (`1b` at batch 1 and 16
against the bandwidth bound), kernel_tests (tests/test_kernel_*.py compiled, in the time left). Each section
estimates its cost first and is skipped, with the reason, when the budget (--budget-s) has too little left.

Every result is appended at once to $OUT/gpu_check.jsonl (one JSON object per measurement) and a readable line to
$OUT/gpu_check.log (bench/results/ when OUT is unset), so a run cut short still returns what it did; at the end
bench/results/gpu-<time>.json (copied to $OUT) holds them all. A peer that is not installed is recorded as
missing, one that refuses the inputs as an error: never as a zero or a win. The data are synthetic random tokens
(the C++ loader is not used).

    python3 bench/gpu_check.py [--budget-s 480] [--sections env,attention]
    .venv/bin/python bench/gpu_check.py --dry-run     # CPU, TRITON_INTERPRET=1, tiny shapes (tests/test_gpu_check.py)
"""
import os
import sys

if "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton is imported, so before anything imports it

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, copy_gbps, gpu_peaks, machine, matmul_tflops, print_table  # noqa: E402
from bench.common import write_results  # noqa: E402
from bench.repo_path import ROOT, KernelsFinder  # noqa: E402

CARRY = ROOT / ".gpu-carry"
GOALS = {"attention ours/best-peer": 0.8, "linear_cross_entropy peak ours/naive": 0.25, "1b MFU": 0.40}


# ---------------------------------------------------------------------------------------------- sizes

@dataclass
class Sizes:
    """Every shape the check uses: real ones on the GPU, tiny ones for the dry run on CPU."""
    heads: tuple = (32, 8, 128)                  # Hq, Hkv, head_dim of Mistral 7B
    gqa3_heads: tuple = (24, 8, 128)
    window: int = 4096
    window_seq: int = 6144                       # > window: the window really cuts
    docs: tuple = (0, 1000, 6000, 8192)          # one document longer than the window
    causal_seq: int = 4096
    norm: tuple = (8192, 4096)                   # tokens, dim
    ce: tuple = (4096, 32000)                    # tokens, vocabulary
    lce: tuple = (4096, 4096, 32000)             # tokens, dim, vocabulary
    attn_seqs: tuple = (4096, 8192, 16384)       # perf rows, B * T = 16384 tokens each
    perf_tokens: int = 16384
    norm_perf: tuple = (16384, 4096)
    ce_perf: tuple = (8192, 32000)
    lce_perf: tuple = (8192, 4096, 32000)
    train: tuple = (("1b", "1b", {}, 4, 2048), ("7b-width-4-layers", "mistral-7b", {"n_layers": 4}, 2, 4096))
    train_steps: tuple = (8, 2)                  # timed, warm-up
    decode: dict = field(default_factory=lambda: dict(preset="1b", batches=[1, 16], prompt_len=512, new_tokens=64,
                                                      reps=2))
    matmul_n: int = 8192
    copy_mib: int = 1024
    # seconds each section is expected to take (compilation included), checked against the time left
    estimates: dict = field(default_factory=lambda: dict(env=10, correctness=60, attention=60, memory_bound=40,
                                                         train=120, decode=45, kernel_tests=60))
    per_attention_seq_s: float = 12
    per_train_run_s: float = 25


DRY_SIZES = Sizes(
    heads=(4, 2, 16), gqa3_heads=(6, 2, 16), window=16, window_seq=48, docs=(0, 10, 40, 64), causal_seq=32,
    norm=(8, 32), ce=(16, 64), lce=(16, 16, 64), attn_seqs=(32,), perf_tokens=32, norm_perf=(64, 64),
    ce_perf=(32, 128), lce_perf=(32, 16, 128),
    train=(("tiny", "tiny", {}, 1, 32),), train_steps=(1, 1),
    decode=dict(preset="tiny", batches=[1, 2], prompt_len=8, new_tokens=4, reps=1), matmul_n=512, copy_mib=64,
    estimates=dict(env=5, correctness=20, attention=15, memory_bound=10, train=20, decode=15, kernel_tests=10),
    per_attention_seq_s=3, per_train_run_s=3)


# ---------------------------------------------------------------------------------------------- recording

def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Recorder:
    """Writes each record to gpu_check.jsonl and a line to gpu_check.log (and stdout) the moment it exists."""

    def __init__(self, out_dir: Path, budget_s: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.budget_s, self.start = out_dir, budget_s, time.monotonic()
        self.jsonl = open(out_dir / "gpu_check.jsonl", "w")
        self.log_file = open(out_dir / "gpu_check.log", "w")
        self.records = []

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s()

    def log(self, message: str) -> None:
        line = f"[{self.elapsed_s():6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def record(self, section: str, name: str, status: str = "ok", **fields) -> dict:
        rec = {"section": section, "name": name, "status": status, "t_s": round(self.elapsed_s(), 2), **fields}
        self.jsonl.write(json.dumps(rec, default=str) + "\n")
        self.jsonl.flush()
        self.records.append(rec)
        self.log(f"{section}/{name}: {status} " + " ".join(f"{k}={fmt(v)}" for k, v in fields.items()
                                                          if v is not None))
        return rec


@dataclass
class Check:
    rec: Recorder
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    dry_run: bool
    matmul_tflops: float = None
    copy_gbps: float = None


def kernel_path(mode: str):
    """cancerllm.kernels' backend `mode` while inside: "triton" runs our kernels (on CPU: under the interpreter),
    "torch" the plain-PyTorch path that, given float64 tensors, is the reference."""
    import cancerllm.kernels
    return cancerllm.kernels.using_backend(mode)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


# ---------------------------------------------------------------------------------------------- (a) env

def section_env(c: Check):
    import cancerllm.kernels
    info = machine()
    c.rec.log("data: synthetic random tokens throughout; the C++ loader is not used")
    c.rec.record("env", "machine", **info, cancerllm_kernels=cancerllm.kernels.__file__,
                 kernels_via_repo_path_shim=KernelsFinder.resolved)
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        c.rec.record("env", "device", name=props.name, sms=props.multi_processor_count,
                     memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    c.matmul_tflops = matmul_tflops(c.device, n=c.sizes.matmul_n)
    c.copy_gbps = copy_gbps(c.device, mib=c.sizes.copy_mib)
    peak_tflops, peak_gbps = gpu_peaks(info.get("gpu", ""))
    c.rec.record("env", "ceilings", matmul_tflops=c.matmul_tflops, copy_gbps=c.copy_gbps,
                 data_sheet_tflops=peak_tflops, data_sheet_gbps=peak_gbps,
                 matmul=f"{'bf16' if c.device.type == 'cuda' else 'fp32'} {c.sizes.matmul_n}^3")


# ---------------------------------------------------------------------------------------------- (b) correctness

def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    err = (actual.detach().double() - expected.detach().double()).abs()
    return {"max_abs": err.max().item() if err.numel() else 0.0,
            "rel": (err.norm() / expected.detach().double().norm().clamp(min=1e-30)).item()}


def compare(c: Check, case: str, op, inputs: list, **options):
    """op(*inputs, **options) on our kernels (storage dtype) against the same op on float64 copies through the
    reference path: every output and every input gradient, one record each, judged by kernels/testing.py's
    assert_close tolerances (the failing ones too: nothing stops at the first failure)."""
    from cancerllm.kernels.testing import assert_close
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if is_float_tensor(t) else t for t in inputs]
    with kernel_path("triton"):
        outs = op(*inputs, **options)
    with kernel_path("torch"):
        ref_outs = op(*ref_inputs, **options)
    outs, ref_outs = (o if isinstance(o, tuple) else (o,) for o in (outs, ref_outs))
    grads = [torch.randn_like(o, dtype=torch.float64) for o in ref_outs]
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(list(ref_outs), grads)
    pairs = [(f"out{i}", o, r) for i, (o, r) in enumerate(zip(outs, ref_outs))]
    pairs += [(f"grad{i}", t.grad, r.grad) for i, (t, r) in enumerate(zip(inputs, ref_inputs))
              if is_float_tensor(t) and t.requires_grad]
    for what, actual, expected in pairs:
        try:
            assert_close(f"{case} {what}", actual, expected, c.dtype)
            status, reason = "ok", None
        except AssertionError as e:
            status, reason = "fail", str(e)
        c.rec.record("correctness", f"{case} {what}", status, shape=list(actual.shape), **error_stats(actual, expected),
                     reason=reason)


def is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def attention_inputs(c: Check, B, T, heads):
    Hq, Hkv, D = heads
    return [torch.randn(B, T, H, D, device=c.device, dtype=c.dtype, requires_grad=True) for H in (Hq, Hkv, Hkv)]


def section_correctness(c: Check):
    from cancerllm import kernels
    s, dev = c.sizes, c.device
    cases = [
        (f"attention T{s.window_seq} window{s.window} GQA{s.heads[0] // s.heads[1]}", kernels.attention,
         lambda: attention_inputs(c, 1, s.window_seq, s.heads), dict(window=s.window)),
        (f"attention packed docs {list(s.docs)} window{s.window}", kernels.attention,
         lambda: attention_inputs(c, 1, s.docs[-1], s.heads),
         dict(window=s.window, cu_seqlens=torch.tensor(s.docs, dtype=torch.int32, device=dev))),
        (f"attention T{s.causal_seq} causal GQA{s.gqa3_heads[0] // s.gqa3_heads[1]}", kernels.attention,
         lambda: attention_inputs(c, 2, s.causal_seq, s.gqa3_heads), {}),
        (f"attention T{s.causal_seq} causal GQA{s.heads[0] // s.heads[1]}", kernels.attention,
         lambda: attention_inputs(c, 1, s.causal_seq, s.heads), {}),
        (f"rms_norm {s.norm[0]}x{s.norm[1]} +residual", kernels.rms_norm, lambda: rms_inputs(c, residual=True), {}),
        (f"rms_norm {s.norm[0]}x{s.norm[1]}", kernels.rms_norm, lambda: rms_inputs(c, residual=False), {}),
        (f"cross_entropy N{s.ce[0]} V{s.ce[1]} ignored rows", kernels.cross_entropy, lambda: ce_inputs(c), {}),
        (f"cross_entropy N{s.ce[0]} V{s.ce[1]} sum z_loss", kernels.cross_entropy, lambda: ce_inputs(c),
         dict(reduction="sum", z_loss=1e-4)),
        (f"linear_cross_entropy N{s.lce[0]} D{s.lce[1]} V{s.lce[2]} ignored rows, token weights",
         kernels.linear_cross_entropy, lambda: lce_inputs(c), {}),
    ]
    for case, op, make_inputs, options in cases:
        try:
            inputs = make_inputs()
            token_weights = inputs.pop() if op is kernels.linear_cross_entropy else None
            extra = {"token_weights": token_weights} if token_weights is not None else {}
            compare(c, case, op, inputs, **options, **extra)
        except Exception as e:   # one broken case must not hide the others
            c.rec.record("correctness", case, "error", error=first_line(e))
        free_memory()


def rms_inputs(c: Check, residual: bool):
    M, N = c.sizes.norm
    x = torch.randn(M, N, device=c.device, dtype=c.dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device=c.device, dtype=c.dtype)).requires_grad_()
    if not residual:
        return [x, w]
    return [x, w, 1e-5, torch.randn(M, N, device=c.device, dtype=c.dtype, requires_grad=True)]


def ignored_targets(c: Check, N: int, V: int) -> torch.Tensor:
    from cancerllm import kernels
    targets = torch.randint(0, V, (N,), device=c.device)
    targets[torch.rand(N, device=c.device) < 0.25] = kernels.IGNORE_INDEX
    return targets


def ce_inputs(c: Check):
    N, V = c.sizes.ce
    logits = (3 * torch.randn(N, V, device=c.device)).to(c.dtype).requires_grad_()
    return [logits, ignored_targets(c, N, V)]


def lce_inputs(c: Check):
    """hidden, weight, targets and (last) the token weights, which compare() passes by keyword."""
    N, D, V = c.sizes.lce
    hidden = torch.randn(N, D, device=c.device, dtype=c.dtype, requires_grad=True)
    weight = (torch.randn(V, D, device=c.device) * D ** -0.5).to(c.dtype).requires_grad_()
    return [hidden, weight, ignored_targets(c, N, V), 2 * torch.rand(N, device=c.device)]


# ---------------------------------------------------------------------------------------------- (c) attention

def peer_summary(c: Check, section: str, name: str, rows: list, goal_key=None):
    """Ours against the fastest peer that ran (fwd, bwd and fwd+bwd speed ratios, above 1: ours faster)."""
    ours = next((r for r in rows if r["provider"] == "ours" and r["status"] == "ok"), None)
    peers = [r for r in rows if r["provider"] != "ours" and r["status"] == "ok"]
    if ours is None or not peers:
        return c.rec.record(section, name, "incomplete", reason="ours or every peer failed or is missing")
    best = min(peers, key=lambda r: r["fwdbwd_ms"])
    ratio = best["fwdbwd_ms"] / ours["fwdbwd_ms"]
    goal = GOALS.get(goal_key) if c.device.type == "cuda" else None   # interpreted kernels are not judged on speed
    return c.rec.record(section, name, best_peer=best["provider"], ours_over_best_peer=ratio,
                        fwd_ratio=min(p["fwd_ms"] for p in peers) / ours["fwd_ms"],
                        bwd_ratio=min(p["bwd_ms"] for p in peers) / max(ours["bwd_ms"], 1e-9),
                        goal=goal, meets_goal=None if goal is None else ratio >= goal)


def record_rows(c: Check, section: str, rows: list):
    for r in rows:
        fields = {k: v for k, v in r.items() if k not in ("op", "shape", "provider", "status")}
        c.rec.record(section, f"{r['op']} {r['shape']} {r['provider']}", r["status"], op=r["op"], shape=r["shape"],
                     provider=r["provider"], **fields)


def run_options(c: Check) -> dict:
    return {"peak_tflops": c.matmul_tflops, "peak_gbps": c.copy_gbps, **({"warmup": 0, "reps": 1} if c.dry_run else {})}


def section_attention(c: Check):
    from bench.kernels import bench_attention
    s = c.sizes
    Hq, Hkv, D = s.heads
    with kernel_path("triton"):
        for T in s.attn_seqs:
            if c.rec.left_s() < s.per_attention_seq_s:
                c.rec.record("attention", f"T{T}", "skipped", reason=f"{c.rec.left_s():.0f} s left of the budget")
                continue
            rows = bench_attention(s.perf_tokens // T, T, Hq, Hkv, D, None, c.dtype, c.device.type, **run_options(c))
            record_rows(c, "attention", rows)
            peer_summary(c, "attention", f"T{T} ours vs best peer", rows, "attention ours/best-peer")
            free_memory()
        T = s.attn_seqs[-1]
        record_rows(c, "attention", bench_attention(1, T, Hq, Hkv, D, s.window, c.dtype, c.device.type,
                                                    **run_options(c)))
        docs = packed_documents(T, 8, c.device)
        record_rows(c, "attention", bench_attention(1, T, Hq, Hkv, D, s.window, c.dtype, c.device.type,
                                                    cu_seqlens=docs, **run_options(c)))


def packed_documents(T: int, n_docs: int, device) -> torch.Tensor:
    """cu_seqlens of `n_docs` documents of random lengths filling T tokens."""
    cuts = torch.randperm(T - 1)[:n_docs - 1].add(1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(device=device, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- (d) memory bound

def section_memory_bound(c: Check):
    from bench.kernels import bench_cross_entropy, bench_linear_cross_entropy, bench_rms_norm
    s = c.sizes
    with kernel_path("triton"):
        for residual in (False, True):
            rows = bench_rms_norm(*s.norm_perf, c.dtype, c.device.type, False, residual, **run_options(c))
            record_rows(c, "memory_bound", rows)
            peer_summary(c, "memory_bound", f"rms_norm residual={residual} ours vs best peer", rows)
        rows = bench_cross_entropy(*s.ce_perf, c.dtype, c.device.type, False, **run_options(c))
        record_rows(c, "memory_bound", rows)
        peer_summary(c, "memory_bound", "cross_entropy ours vs best peer", rows)
        free_memory()
        N, D, V = s.lce_perf
        rows = bench_linear_cross_entropy(N, D, V, c.dtype, c.device.type, **run_options(c))
        record_rows(c, "memory_bound", rows)
        peer_summary(c, "memory_bound", "linear_cross_entropy ours vs best peer", rows)
    peaks = {r["provider"]: r.get("peak_mb") for r in rows if r["status"] == "ok"}
    if peaks.get("ours") and peaks.get("naive"):
        ratio, goal = peaks["ours"] / peaks["naive"], GOALS["linear_cross_entropy peak ours/naive"]
        c.rec.record("memory_bound", "linear_cross_entropy peak memory ours/naive", ours_mb=peaks["ours"],
                     naive_mb=peaks["naive"], ratio=ratio, goal=goal, meets_goal=ratio <= goal)
    else:
        c.rec.record("memory_bound", "linear_cross_entropy peak memory ours/naive", "not measured",
                     reason="peak memory is measured on CUDA only (bench/kernels.py measures CPU RSS apart)")


# ---------------------------------------------------------------------------------------------- (e) train

def section_train(c: Check):
    from bench.train import measure_training
    from cancerllm import ModelArgs
    steps, warmup = c.sizes.train_steps
    data_sheet_tflops = gpu_peaks(torch.cuda.get_device_name(c.device))[0] if c.device.type == "cuda" else None
    for name, preset, overrides, batch, seq_len in c.sizes.train:
        args = ModelArgs.preset(preset, **overrides)
        for checkpoint_every in (0, 1):
            label = f"{name} B{batch} T{seq_len} activation_checkpoint={checkpoint_every}"
            if c.rec.left_s() < c.sizes.per_train_run_s:
                c.rec.record("train", label, "skipped", reason=f"{c.rec.left_s():.0f} s left of the budget")
                continue
            try:
                row = measure_training("ours", args, batch, seq_len, steps, warmup, c.device, checkpoint_every)
            except Exception as e:   # out of memory or a broken step: the other runs still tell something
                c.rec.record("train", label, "error", error=first_line(e))
                free_memory()
                continue
            row["mfu_measured_peak"] = row["model_tflops"] / c.matmul_tflops if c.matmul_tflops else None
            row["mfu_data_sheet"] = row["model_tflops"] / data_sheet_tflops if data_sheet_tflops else None
            row.pop("mfu", None)
            is_goal_row = name == "1b" and data_sheet_tflops is not None   # a GPU in cancerllm.hardware's table
            goal = GOALS["1b MFU"] if is_goal_row else None
            c.rec.record("train", label, params=args.num_params(), **row, goal=goal,
                         meets_goal=None if goal is None else row["mfu_data_sheet"] >= goal)
            free_memory()


# ---------------------------------------------------------------------------------------------- (f) decode

def section_decode(c: Check):
    from bench.generate import decode_benchmark
    tokenizer = CARRY / "tokenizer.model.v1"
    d = c.sizes.decode
    dtype = torch.bfloat16 if c.device.type == "cuda" else torch.float32
    rows, facts = decode_benchmark(d["preset"], d["batches"], d["prompt_len"], d["new_tokens"], d["reps"],
                                   c.device, dtype, tokenizer if tokenizer.is_file() else None,
                                   peers=importlib.util.find_spec("transformers") is not None,
                                   bandwidth_gbps=c.copy_gbps)
    c.rec.record("decode", "facts", preset=d["preset"], dtype=str(dtype), **facts)
    for row in rows:
        c.rec.record("decode", f"{d['preset']} batch {row['batch']} {row['engine']}", **row)


# ---------------------------------------------------------------------------------------------- (g) kernel tests

def section_kernel_tests(c: Check):
    """The kernel tests compiled for CUDA (collected only in the dry run: under the interpreter they take
    minutes), in the budget's time left less a margin for writing the results."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), "-m", "pytest", "-p", "bench.repo_path", "-q",
           "-p", "no:cacheprovider"]
    left = c.rec.left_s() - 15
    if c.dry_run:
        cmd.append("--collect-only")
    else:
        if importlib.util.find_spec("xdist"):
            cmd += ["-n", "8"]
        if importlib.util.find_spec("pytest_timeout"):
            cmd.append(f"--timeout={int(min(120, max(left, 1)))}")   # per test: one hung test cannot eat the rest
    env = {**os.environ, "CANCERLLM_TEST_DEVICE": c.device.type, "TRITON_INTERPRET": "1" if c.dry_run else "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("CANCERLLM_KERNELS", None)
    c.rec.log("$ " + " ".join(cmd + files) + "   (output: kernel_tests.log)")
    log_path = c.rec.out_dir / "kernel_tests.log"
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(cmd + files, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=max(left, 5)).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    output = log_path.read_text(errors="replace").strip()
    c.rec.log(output[-6000:])
    if returncode is None:
        return c.rec.record("kernel_tests", "pytest", "timeout", reason=f"stopped after {left:.0f} s")
    summary = output.splitlines()[-1] if output else ""
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|errors?|skipped|tests? collected)",
                                                   summary)}
    c.rec.record("kernel_tests", "pytest", "ok" if returncode == 0 else "fail", returncode=returncode,
                 summary=summary, **counts)


# ---------------------------------------------------------------------------------------------- main

SECTIONS = {"env": section_env, "correctness": section_correctness, "attention": section_attention,
            "memory_bound": section_memory_bound, "train": section_train, "decode": section_decode,
            "kernel_tests": section_kernel_tests}


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_section(c: Check, name: str):
    estimate = c.sizes.estimates[name]
    left = c.rec.left_s()
    if estimate > left:
        c.rec.record(name, "section", "skipped", estimate_s=estimate,
                     reason=f"needs ~{estimate} s, {max(left, 0):.0f} s left of the {c.rec.budget_s:.0f} s budget")
        return
    c.rec.log(f"== {name} (estimate {estimate} s, {left:.0f} s left)")
    start = time.monotonic()
    try:
        SECTIONS[name](c)
        status, error = "done", None
    except Exception as e:   # a section that breaks is reported; the sections after it still run
        status, error = "error", first_line(e)
        c.rec.log(traceback.format_exc())
    c.rec.record(name, "section", status, estimate_s=estimate, elapsed_s=time.monotonic() - start, error=error)
    free_memory()


def print_summary(records: list):
    sections = [r for r in records if r["name"] == "section"]
    print_table(sections, ["section", "status", "estimate_s", "elapsed_s", "reason", "error"])
    goals = [r for r in records if r.get("goal") is not None]
    if goals:
        print()
        print_table([{**r, "value": r.get("ours_over_best_peer", r.get("ratio", r.get("mfu_data_sheet")))}
                     for r in goals], ["section", "name", "value", "goal", "meets_goal"])
    failed = [r for r in records if r["status"] in ("fail", "error")]
    print(f"\n{len(records)} records, {len(failed)} failed or errored")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole check (seconds)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args()
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine (bench/gpu.sh), or --dry-run here")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    rec = Recorder(out_dir, args.budget_s)
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    c = Check(rec, device, torch.bfloat16, DRY_SIZES if args.dry_run else Sizes(), args.dry_run)
    rec.log(f"gpu_check: {'dry run on CPU' if args.dry_run else 'CUDA'}, budget {args.budget_s:.0f} s, "
            f"sections {', '.join(names)}; results in {out_dir}")
    if "env" not in names:   # later sections judge against the ceilings; measure them even when env is not run
        c.matmul_tflops = matmul_tflops(device, n=c.sizes.matmul_n)
        c.copy_gbps = copy_gbps(device, mib=c.sizes.copy_mib)
    for name in names:
        run_section(c, name)
    path = write_results("gpu", rec.records, budget_s=args.budget_s, dry_run=args.dry_run, sections=names)
    if out_dir != RESULTS_DIR:
        shutil.copy(path, out_dir / path.name)
    print_summary(rec.records)
    rec.log(f"wrote {path}")


if __name__ == "__main__":
    main()
