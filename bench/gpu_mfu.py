"""GPU training speed and memory on Qwen2.5-0.5B- and 1.5B-shaped models (random weights, nothing downloaded).

    python bench/gpu_mfu.py                                  # every combination below, ~10 minutes on an H100
    python bench/gpu_mfu.py --sizes 1.5B --methods full --seq_lens 4096 --losses fused,plain
    python bench/gpu_mfu.py --smoke                          # tiny shapes, one step, any device: checks the code

Each run is its own process: bf16 weights, AdamW, no gradient checkpointing, a few warm-up steps then timed steps on
synthetic conversations (log-normal lengths, mean ~300 tokens, learned labels on the second half of each). Varied:
- method: LoRA (r 16, all linear layers) or full fine-tuning;
- batching: packed (trl's best-fit-decreasing bins of seq_len; flattened with cu_seq_lens under flash_attention_2,
  packed rows under sdpa, see medicalgpt/train/packing.py) or padded (the same conversations padded to the longest);
- loss: fused (trl's fused LM head, what SFT uses on GPU), chunked (medicalgpt/train/chunked_loss.py), plain
  (transformers' loss on the full [tokens x vocab] logits) or liger (Liger's fused linear cross-entropy, when
  installed).
Printed as JSON: real tokens/s, MFU against 989 TFLOP/s (H100 dense bf16; --peak_tflops to change), peak memory.
Model FLOPs: 6 x matmul parameters per token (4 x for LoRA's frozen weights, which get no weight gradient), the
tied LM head included, plus causal attention, 6 x layers x hidden x length^2 per conversation; padding counts nothing.
Without a CUDA GPU it prints why as JSON and runs nothing.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN25_SHAPES = {  # from the models' config.json files
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}  # fmt: skip
QWEN25_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True, hidden_act="silu")  # fmt: skip


def build_model(size, attention, loss, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if loss == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    common = dict(QWEN25_COMMON, vocab_size=4096) if size == "smoke" else QWEN25_COMMON
    config = Qwen2Config(**QWEN25_SHAPES[size], **common, attn_implementation=attention)
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def conversations(vocab_size, count, seq_len, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = max(16, min(seq_len, int(rng.lognormvariate(math.log(250), 0.7))))
        ids = [rng.randrange(10, vocab_size) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


def batches(examples, batching, attention, seq_len, batch_size, steps):
    """`steps` batches of `batch_size` packed rows each (or the same conversations padded), each with the lengths of
    its conversations."""
    import datasets
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medicalgpt.train.packing import PackedRowsCollator

    rows = pack_dataset(datasets.Dataset.from_list(examples), seq_len, "bfd").shuffle(seed=0)  # as the Trainer does
    out = []
    for step in range(steps):
        chunk = [rows[i] for i in range(step * batch_size, (step + 1) * batch_size)]
        lengths = [n for row in chunk for n in row["seq_lengths"]]
        if batching == "padded":
            docs = []
            for row in chunk:
                offsets = [sum(row["seq_lengths"][:i]) for i in range(len(row["seq_lengths"]))]
                docs += [{k: row[k][o : o + n] for k in ("input_ids", "labels")}
                         for o, n in zip(offsets, row["seq_lengths"])]  # fmt: skip
            batch = DataCollatorForLanguageModeling(pad_token_id=0)(docs)
        elif attention.startswith("flash"):  # varlen kernel: trl's flattened padding-free batch
            batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(chunk)
            batch.pop("seq_idx", None)
        else:  # mask-based kernel: packed rows
            batch = PackedRowsCollator(pad_token_id=0)(chunk)
        out.append((batch, lengths))
    return out


def train_flops(model, lengths, method, lora_params):
    """Model FLOPs of one training step over conversations of `lengths` (the padding is not useful work)."""
    config = model.config
    matmul = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name) - lora_params
    matmul += config.vocab_size * config.hidden_size  # the (tied) LM head is a matmul all the same
    per_param = 4 if method == "lora" else 6  # frozen weights: forward and input gradients only
    attention = 6 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)  # causal half
    return (per_param * matmul + 6 * lora_params) * sum(lengths) + attention


def run_one(spec):
    """One configuration, in this process: returns its figures."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(spec["size"], spec["attention"], spec["loss"], device)
    if spec["loss"] == "fused":  # before PEFT wraps the model
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    elif spec["loss"] == "chunked":
        from medicalgpt.train.chunked_loss import add_chunked_lm_head

        add_chunked_lm_head(model)
    lora_params = 0
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device == "cuda")
    loss_kwargs = {"fused": {"fused_lm_head": True}, "chunked": {"chunked_loss": True}}.get(spec["loss"], {})
    examples = conversations(model.config.vocab_size, spec["conversations"], spec["seq_len"])
    warmup, timed = spec["warmup_steps"], spec["steps"]
    data = batches(examples, spec["batching"], spec["attention"], spec["seq_len"], spec["batch_size"], warmup + timed)

    def step(batch):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        model(**{**batch, "use_cache": False}, **loss_kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch, _ in data[:warmup]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch, _ in data[warmup:]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lengths = [n for _, step_lengths in data[warmup:] for n in step_lengths]
    processed = sum(batch["input_ids"].numel() for batch, _ in data[warmup:])
    flops = train_flops(model, lengths, spec["method"], lora_params)
    return {
        **spec,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "real_tokens_per_s": round(sum(lengths) / seconds),
        "padding_fraction": round(1 - sum(lengths) / processed, 4),
        "mfu": round(flops / seconds / (spec["peak_tflops"] * 1e12), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "seconds_per_step": round(seconds / timed, 3),
    }


def plan(args):
    import importlib.util

    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    losses = [loss for loss in args.losses.split(",") if loss != "liger" or importlib.util.find_spec("liger_kernel")]
    base = dict(attention=attention, warmup_steps=2, steps=5, peak_tflops=args.peak_tflops, batch_size=args.batch_size)
    if args.smoke:  # every code path once
        base.update(size="smoke", warmup_steps=1, steps=1, batch_size=2, seq_len=512, conversations=64)
        combos = [("lora", "packed", "fused"), ("full", "padded", "chunked"), ("full", "packed", "plain")]
        return [dict(base, method=m, batching=b, loss=loss) for m, b, loss in combos if loss in losses]
    specs = []
    for seq_len in map(int, args.seq_lens.split(",")):
        for size in args.sizes.split(","):
            for method in args.methods.split(","):
                for batching in args.batchings.split(","):
                    for loss in losses:
                        count = (base["warmup_steps"] + base["steps"]) * args.batch_size * seq_len // 150
                        specs.append(dict(base, size=size, method=method, batching=batching, loss=loss,
                                          seq_len=seq_len, conversations=count))  # fmt: skip
    return specs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5B,1.5B")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--batchings", default="packed,padded")
    parser.add_argument("--losses", default="fused,chunked,plain,liger", help="liger only where it is installed")
    parser.add_argument("--seq_lens", default="2048,4096")
    parser.add_argument("--batch_size", type=int, default=4, help="packed rows of seq_len tokens per step")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100: 989)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one step, any device")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("BENCH " + json.dumps(run_one(json.loads(args.child))), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"skipped": "no CUDA GPU: bench/gpu_mfu.py measures GPU training; nothing was run",
                          "torch": torch.__version__, "cuda_available": False}))  # fmt: skip
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    results = []
    for spec in plan(args):
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                               capture_output=True, text=True)  # fmt: skip
        lines = [line for line in child.stdout.splitlines() if line.startswith("BENCH ")]
        result = json.loads(lines[-1][6:]) if lines else {**spec, "error": child.stderr[-1500:]}
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
