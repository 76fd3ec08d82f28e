"""The machine's measured peak for the matrix products that training runs, printed as JSON.

    python bench/peak.py                                    # SmolLM2-135M-Instruct's shapes, 1,024 tokens, 2 threads
    python bench/peak.py --model models/tiny-qwen --tokens 2048 --threads 2 --json peak.json

For each linear layer of the model (bench/flops.py: q/k/v/o, gate/up/down, the LM head) and each dtype (float32,
bfloat16) it times the three products that training runs for a batch of --tokens tokens: forward (X W^T, as
torch.nn.functional.linear does), the input's gradient (dY W) and the weight's gradient (dY^T X), each 2 x tokens x
in x out FLOPs; then one square --square x --square x --square product per dtype, an upper bound for these kernels.
Each is run --warmup times, then timed over --repeats samples (of enough calls to last ~20 ms each): the median
GFLOP/s and the spread (min-max) are reported, and the rate per CPU second of the process times the threads
("gflops_per_cpu_s_x_threads": what the product reaches when the cores are its own; read it when the load average
says other jobs shared them, and trust the medians only on a quiet machine).

The peak that MFU is stated against ("peak_for_mfu") is the best median float32 GFLOP/s at the model's shapes:
what this machine's CPU and torch reach on the products that float32 training consists of.

Threads are pinned as bench/sft_throughput.py pins them (OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS
and torch.set_num_threads to --threads), so the peak and the training runs use the same cores.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "smollm2-135m-instruct")
KERNELS = ("forward", "input_grad", "weight_grad")


def operands(kernel, tokens, fan_in, fan_out, dtype, torch):
    """The function and the two random operands of one of training's products for a linear layer."""
    rand = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    if kernel == "forward":  # Y[t, out] = X[t, in] W[out, in]^T
        return torch.nn.functional.linear, rand(tokens, fan_in), rand(fan_out, fan_in)
    if kernel == "input_grad":  # dX[t, in] = dY[t, out] W[out, in]
        return torch.mm, rand(tokens, fan_out), rand(fan_out, fan_in)
    return torch.mm, rand(fan_out, tokens), rand(tokens, fan_in)  # dW[out, in] = dY^T[out, t] X[t, in]


def time_product(function, a, b, flops, warmup, repeats, sample_s=0.02):
    """GFLOP/s of `function(a, b)` after `warmup` calls, over `repeats` timed samples of enough calls to last about
    `sample_s` seconds each: (median, min, max) of the wall-clock rates, and the rate per CPU second of the process
    times the threads (what the product reaches when the cores are its own; less sensitive to other jobs)."""
    from bench.common import median_and_spread

    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        function(a, b)
    calls = max(1, math.ceil(sample_s / ((time.perf_counter() - start) / max(warmup, 1))))
    rates, cpu_start = [], time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function(a, b)
        rates.append(calls * flops / (time.perf_counter() - start) / 1e9)
    cpu_rate = repeats * calls * flops / (time.process_time() - cpu_start) / 1e9
    return median_and_spread(rates), cpu_rate


def measure(name, kernel, shape, dtype, args, torch):
    """One row of the results: a product of `shape` (tokens, in, out) in `dtype`."""
    tokens, fan_in, fan_out = shape
    flops = 2 * tokens * fan_in * fan_out
    function, a, b = operands(kernel, tokens, fan_in, fan_out, getattr(torch, dtype), torch)
    (median, low, high), cpu_rate = time_product(function, a, b, flops, args.warmup, args.repeats)
    return {
        "layer": name, "kernel": kernel, "dtype": dtype, "tokens_in_out": list(shape), "gflop": round(flops / 1e9, 3),
        "median_gflops": round(median, 1), "spread_gflops": [round(low, 1), round(high, 1)],
        "gflops_per_cpu_s_x_threads": round(cpu_rate * args.threads, 1),
    }  # fmt: skip


def cpu_name():
    """The CPU's model name (Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def model_shapes(model, tokens):
    """(layer name, (tokens, in, out)) of the model's distinct linear layers."""
    from bench.flops import linear_layers, read_config

    seen, shapes = set(), []
    for name, fan_in, fan_out in linear_layers(read_config(model)):
        if (fan_in, fan_out) not in seen:  # k_proj and v_proj, gate_proj and up_proj share a shape
            seen.add((fan_in, fan_out))
            shapes.append((name, (tokens, fan_in, fan_out)))
    return shapes


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder whose config.json gives the shapes")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in a batch (rows x length)")
    parser.add_argument("--threads", type=int, default=2, help="as bench/sft_throughput.py --threads")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--square", type=int, default=2048, help="side of the square product (0: none)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"--model: no config.json in {args.model} (make real-model builds the default)")
    from bench.common import load_average, pinned_threads_env

    os.environ.update(pinned_threads_env({}, args.threads))  # before torch starts its thread pools
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtypes, load_before = args.dtypes.split(","), load_average()
    try:
        rows = [
            measure(name, kernel, shape, dtype, args, torch)
            for dtype in dtypes
            for name, shape in model_shapes(args.model, args.tokens)
            for kernel in KERNELS
        ]
        side = args.square
        square = [measure("square", "forward", (side, side, side), dtype, args, torch) for dtype in dtypes if side]
    finally:
        torch.set_num_threads(threads_before)
    best = {
        dtype: max((row for row in rows if row["dtype"] == dtype), key=lambda row: row["median_gflops"])
        for dtype in dtypes
    }
    results = {
        "model": os.path.abspath(args.model), "tokens": args.tokens, "threads": args.threads,
        "cpu": cpu_name(), "torch": torch.__version__,
        "load_before_after": [load_before, load_average()], "warmup": args.warmup, "repeats": args.repeats,
        "best_at_model_shapes": {dtype: row["median_gflops"] for dtype, row in best.items()},
        "square": square, "results": rows,
    }  # fmt: skip
    if "float32" in best:
        row = best["float32"]
        results["peak_for_mfu"] = {
            "gflops": row["median_gflops"], "dtype": "float32", "layer": row["layer"], "kernel": row["kernel"],
            "gflops_per_cpu_s_x_threads": row["gflops_per_cpu_s_x_threads"], "threads": args.threads,
            "rule": "the best median float32 GFLOP/s among the products of the model's linear layers "
            "(forward, input gradient, weight gradient) at this many tokens",
        }  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
