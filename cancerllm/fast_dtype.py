"""Which floating-point type a model computes in on this machine's CPU, chosen by measuring on it.

bf16 is a CPU's fast path only where the CPU multiplies it natively. On an AMX Xeon a 2048³ bf16 matmul ran ~7x
fp32's rate (2.1 against 0.3 TFLOP/s); on an Ice Lake Xeon without AVX512-BF16 or AMX, where oneDNN emulates bf16,
it ran at a quarter of fp32's (0.05 against 0.20 TFLOP/s) and decoding SmolLM2 in bf16 took 2.7x as long; oneDNN
calls bf16 supported on both. So the settings that ask for the faster type ("fastest": train.py's
parallel.mixed_precision, Generator.from_pretrained's dtype, the demo's evaluation) time the model's own block
linears (x W^T at the rows they will run) in each type here, alternating, and take bf16 only when it is at least
BF16_MARGIN faster: a near tie keeps fp32, whose numbers are the more exact, and keeps the choice from flipping
between runs on a machine where the two are close. A GPU computes in bf16 without asking.

The answer is cached with decode_paths' measurements (the same file, keyed by machine, shapes and rows), so a
machine measures once per model shape (about a second at SmolLM2's, most of it emulated bf16) and every process on
it, the training ranks, the evaluation and an embedding program among them, then makes the same choice.
"""
import torch
import torch.nn.functional as F

from .decode_paths import best_times, machine_key, remembered

CANDIDATES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BF16_MARGIN = 1.25
MAX_ROWS = 1024   # more rows run at the same rate: timing them would cost time, not change the answer
ROUNDS = 3        # each type's best round counts


def fastest_dtype(args, rows: int, device="cpu") -> torch.dtype:
    """bf16 or fp32: the faster for a model of `args` (a ModelArgs) multiplying inputs of `rows` rows on `device`
    (bf16 on a GPU; on the CPU measured here once, then cached)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    rows = max(1, min(rows, MAX_ROWS))
    shapes = args.block_linear_shapes()
    key = f"{machine_key()} | compute dtype | {rows} rows | {' '.join(f'{k}x{n}' for k, n in shapes)}"
    return CANDIDATES[remembered(key, CANDIDATES, lambda: faster_of(time_linears(shapes, rows)))]


def faster_of(seconds: dict) -> str:
    """"bfloat16" when its time beats fp32's by BF16_MARGIN, else "float32"."""
    return "bfloat16" if seconds["bfloat16"] * BF16_MARGIN < seconds["float32"] else "float32"


def time_linears(shapes, rows: int) -> dict:
    """Seconds of one pass of x W^T over the (in, out) `shapes` at `rows` rows, per type name (best of ROUNDS)."""
    runs, generator = {}, torch.Generator().manual_seed(0)   # the caller's random stream left as it was
    for name, dtype in CANDIDATES.items():
        operands = [tuple(torch.randn(m, k, generator=generator).to(dtype) for m in (rows, n)) for k, n in shapes]
        runs[name] = lambda operands=operands: [F.linear(x, w) for x, w in operands]
    with torch.inference_mode():
        return best_times(runs, rounds=ROUNDS, calls=1)
