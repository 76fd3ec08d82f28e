"""Causal attention of one conversation on CPU, torch's flash-attention kernel against its math kernel: forward and
backward milliseconds and GFLOP/s at a model's head shapes, to set attention's share of a training step against
the matrix products' peak (bench/peak.py).

    python bench/attention_kernels.py                          # SmolLM2-135M's heads: 9 query, 3 key/value, 64
    python bench/attention_kernels.py --heads 14 --kv_heads 2 --lengths 256,1024,4096   # Qwen2.5-0.5B's

FLOPs counted as bench/flops.py counts attention: 2 * 2 * L^2 / 2 * heads * head_dim forward (QK^T and PV over the
causal half), backward 2.5 times that. Median of --repeats after 2 warm-up calls, --threads pinned. Prints JSON.
"""

import argparse
import json
import os
import statistics
import time


def timed(backend, q, k, v, repeats):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def once():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(backend):
            start = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            middle = time.perf_counter()
        out.sum().backward()
        return middle - start, time.perf_counter() - middle

    once(), once()
    samples = [once() for _ in range(repeats)]
    return [statistics.median(s[i] for s in samples) * 1e3 for i in (0, 1)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv_heads", type=int, default=3)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from torch.nn.attention import SDPBackend

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, args.heads, length, args.head_dim, generator=generator).requires_grad_()
        k, v = (
            torch.randn(1, args.kv_heads, length, args.head_dim, generator=generator).requires_grad_() for _ in "kv"
        )
        forward_gflop = 2 * 2 * length * length / 2 * args.heads * args.head_dim / 1e9
        row = {"tokens": length}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            forward_ms, backward_ms = timed(backend, q, k, v, args.repeats)
            gflops = forward_gflop * 3.5 / ((forward_ms + backward_ms) / 1e3)
            row[name] = {
                "forward_ms": round(forward_ms, 3),
                "backward_ms": round(backward_ms, 3),
                "gflops": round(gflops, 1),
            }
        rows.append(row)
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "threads": args.threads}
    print(json.dumps({**shape, "rows": rows, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
