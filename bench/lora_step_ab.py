"""One LoRA training step (forward + backward, the chunked loss) on a real model, A/B: peft's LoRA layer against
ours (medicalgpt/model/fused_lora.py, what training uses), interleaved, in process CPU time.

    python bench/lora_step_ab.py --model models/smollm2-135m-instruct --rows 2 --max_length 1024 --repeats 7

The batch is real: upstream's medical SFT conversations, tokenised as SFT tokenises them (template, learned answers),
packed into --rows rows of --max_length tokens with position_ids restarting per conversation, as training packs
them. Both models start from the same weights (LoRA B random, so every gradient is non-zero) and run with
--lora_dropout. Each repeat times every variant once, in a rotated order; CPU time (process_time: all threads) is
less sensitive than wall time to other jobs on the machine, not immune: state the load average. Prints JSON.
"""

import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import real_rows_parser  # noqa: E402


def packed_batch(model_dir, data, rows, max_length):
    """input_ids, position_ids and labels of `rows` packed rows (conversations that do not fit are skipped)."""
    import torch
    from transformers import AutoTokenizer

    from medicalgpt.data.validate import load_records
    from medicalgpt.processors.sft import tokenize_conversation
    from medicalgpt.templates import get_conv_template

    tokenizer, template = AutoTokenizer.from_pretrained(model_dir), get_conv_template("qwen")
    ids, positions, labels = [[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)]
    for record in load_records([data], "sft", skip_invalid=True):
        example = tokenize_conversation(record, template, tokenizer, max_length=max_length)
        row = next((r for r in range(rows) if len(ids[r]) + len(example["input_ids"]) <= max_length), None)
        if row is not None:
            ids[row] += example["input_ids"]
            labels[row] += example["labels"]
            positions[row] += list(range(len(example["input_ids"])))
        if all(len(r) > max_length - 16 for r in ids):
            break
    width = min(len(r) for r in ids)  # equal rows, no padding
    as_tensor = lambda lists: torch.tensor([r[:width] for r in lists])  # noqa: E731
    return {"input_ids": as_tensor(ids), "position_ids": as_tensor(positions), "labels": as_tensor(labels)}


def lora_model(base, fused, dropout):
    import torch

    from medicalgpt.args import LoraArguments
    from medicalgpt.model.adapter import build_lora_config
    from medicalgpt.model.fused_lora import use_fused_lora_linear
    from medicalgpt.train.chunked_loss import add_chunked_lm_head

    config = build_lora_config(LoraArguments(use_peft=True, target_modules="all", lora_dropout=dropout))
    if fused:
        use_fused_lora_linear(config)
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.01)
    add_chunked_lm_head(model.get_base_model())
    return model.train()


def step_cpu_seconds(model, batch):
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    model(**batch, chunked_loss=True).loss.backward()
    return time.process_time() - start


def main():
    parser = real_rows_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_dropout_row", action="store_true", help="also time the fused layer at dropout 0")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    batch = packed_batch(args.model, args.data, args.rows, args.max_length)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    variants = {"peft": lora_model(base, False, args.lora_dropout), "fused": lora_model(base, True, args.lora_dropout)}
    if args.no_dropout_row:
        variants["fused_dropout_0"] = lora_model(base, True, 0.0)
    del base
    for model in variants.values():  # warm-up: first-call allocations
        step_cpu_seconds(model, batch)
    times = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(step_cpu_seconds(variants[name], batch))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "tokens": int(batch["input_ids"].numel()),
        "learned": int((batch["labels"] != -100).sum()),
        "threads": args.threads,
        "lora_dropout": args.lora_dropout,
        "cpu_s_median": {k: round(v, 3) for k, v in medians.items()},
        "cpu_s_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "saves_vs_peft": {k: round(1 - v / medians["peft"], 4) for k, v in medians.items() if k != "peft"},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
