"""Tokens per second of batch inference: one prompt at a time vs left-padded batches (the engine of inference.py).

    python -m bench.batch_inference                          # the tiny model, CPU
    python -m bench.batch_inference --model merged-sft-qwen-v1 --num_prompts 64 --batch_size 8 --max_new_tokens 128

Prints one JSON object. Greedy decoding; tokens are the answer tokens generated (padding not counted), so an
answer that ends early counts only what it produced. Each mode first makes one untimed pass over the same prompts:
the first time torch meets a tensor shape on CPU costs far more than the generation itself, and one prompt at a
time meets a new shape per prompt length.
"""

import argparse
import json
import time

import torch

from bench.common import model_path, sample_questions
from medicalgpt.serve.chat import ChatArguments, GenerationOptions, load_chat_engine


def measure(engine, conversations, options, batch_size):
    start, tokens = time.perf_counter(), 0
    for first in range(0, len(conversations), batch_size):
        completions = engine.generate(conversations[first : first + batch_size], options)
        tokens += sum(completion.completion_tokens for completion in completions)
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: models/tiny-qwen, else a tiny model built now)")
    parser.add_argument("--lora_model")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    engine = load_chat_engine(ChatArguments(base_model=model_path(args.model), lora_model=args.lora_model))
    conversations = [[{"role": "user", "content": q}] for q in sample_questions(args.num_prompts)]
    options = GenerationOptions(temperature=0, max_new_tokens=args.max_new_tokens)
    measure(engine, conversations, options, 1)  # warm-up passes
    measure(engine, conversations, options, args.batch_size)
    single = measure(engine, conversations, options, 1)
    batched = measure(engine, conversations, options, args.batch_size)
    result = {
        "benchmark": "batch_inference",
        "model": engine.model.config._name_or_path,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "device": str(engine.model.device),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(conversations),
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time": single,
        "batched": batched,
        "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
