"""The chunked loss's two paths on a real model's head, A/B: gradients computed in forward beside each chunk's loss
(`LinearCrossEntropy`, what training runs) against chunks recomputed in backward under activation checkpointing
(`checkpointed_chunks_loss`, what runs where the head's weight cannot be read whole), interleaved, in process CPU
time.

    python bench/lm_loss_ab.py --repeats 7                       # SmolLM2-135M-Instruct's head, 2,000 tokens
    python bench/lm_loss_ab.py --vocab 151936 --hidden 896       # Qwen2.5-0.5B's shape

One forward and backward of the loss over --tokens learned positions (random hidden states and targets, the head's
weight from --model or random at the given shape), full-parameter (the head trains) and LoRA (the head is frozen).
Prints JSON: medians, spreads, the gain, the load average, and the largest difference between the two paths' loss
and gradients (relative to each one's largest value).
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import REAL_MODEL  # noqa: E402


def head_weight(args):
    import torch

    if args.vocab:
        return torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0)) * 0.02
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model.get_output_embeddings().weight.detach().clone()


def run(path, head, hidden, targets, chunk_size):
    """CPU seconds of one forward and backward, and the loss and gradients."""
    from medicalgpt.train.chunked_loss import LinearCrossEntropy, checkpointed_chunks_loss

    hidden.grad = head.weight.grad = None
    start = time.process_time()
    if path == "in_forward":
        loss = LinearCrossEntropy.apply(hidden, head.weight, targets, chunk_size, True)
    else:
        loss = checkpointed_chunks_loss(hidden, head, targets, chunk_size)
    loss.backward()
    seconds = time.process_time() - start
    return seconds, loss.detach(), hidden.grad, head.weight.grad


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=REAL_MODEL)
    parser.add_argument("--vocab", type=int, default=None, help="a random head of this many rows instead of --model's")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from torch import nn

    from medicalgpt.train.chunked_loss import LOGITS_PER_CHUNK

    torch.set_num_threads(args.threads)
    weight = head_weight(args)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data.copy_(weight)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.tokens, weight.shape[1], generator=generator).requires_grad_()
    targets = torch.randint(0, weight.shape[0], (args.tokens,), generator=generator)
    chunk_size = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    paths, result = ("checkpointed", "in_forward"), {}
    for method in ("full", "lora"):
        head.weight.requires_grad_(method == "full")
        outputs = {path: run(path, head, hidden, targets, chunk_size)[1:] for path in paths}  # warm-up, compared
        times = {path: [] for path in paths}
        for repeat in range(args.repeats):
            for path in paths[repeat % 2 :] + paths[: repeat % 2]:
                times[path].append(run(path, head, hidden, targets, chunk_size)[0])
        medians = {path: statistics.median(t) for path, t in times.items()}
        differences = [  # each of loss, hidden states' and head's gradient, relative to its largest value
            ((a - b).abs().max() / b.abs().max()).item()
            for a, b in zip(outputs["checkpointed"], outputs["in_forward"])
            if a is not None and b is not None
        ]
        result[method] = {
            "cpu_s_median": {path: round(m, 3) for path, m in medians.items()},
            "cpu_s_spread": {path: [round(min(t), 3), round(max(t), 3)] for path, t in times.items()},
            "saves": round(1 - medians["in_forward"] / medians["checkpointed"], 4),
            "max_relative_difference": max(differences),
        }
    shape = {"vocab": weight.shape[0], "hidden": weight.shape[1], "tokens": args.tokens, "chunk_rows": chunk_size}
    print(json.dumps({**shape, "threads": args.threads, **result, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
