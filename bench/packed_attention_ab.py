"""One full-parameter training step (forward + backward, the chunked loss) on packed rows of real conversations, A/B:
transformers' sdpa with its block-diagonal mask against "packed_sdpa" (medicalgpt/train/packed_attention.py, one
sdpa call per conversation), interleaved, in process CPU time and wall time.

    python bench/packed_attention_ab.py --model models/smollm2-135m-instruct --rows 2 --max_length 1024 --repeats 7

The batch is bench/lora_step_ab.py's: upstream's medical SFT conversations tokenised as SFT tokenises them, packed
into --rows rows of --max_length tokens with position_ids restarting per conversation. One model, its attention
switched between the two before each step (same weights, same batch: equal work). Each repeat times both once, in a
rotated order. Also printed: how far the two losses are apart (the outputs are the same up to float rounding).
Prints JSON.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import real_rows_parser  # noqa: E402


def step_seconds(model, attention, batch, chunked_loss=True):
    """(CPU seconds, wall seconds, loss) of one forward and backward with `attention` (the GPU waited for)."""
    import torch

    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    synchronize = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    loss = model(**batch, **({"chunked_loss": True} if chunked_loss else {})).loss
    loss.backward()
    synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall, loss.item()


def interleaved_steps(model, batch, repeats, chunked_loss=True):
    """{attention: [(CPU s, wall s), ...]} and {attention: loss}: sdpa and packed_sdpa in turn, rotated each repeat,
    after one warm-up step each."""
    from medicalgpt.train.packed_attention import PACKED_SDPA

    names = ["sdpa", PACKED_SDPA]
    losses = {name: step_seconds(model, name, batch, chunked_loss)[2] for name in names}
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % 2 :] + names[: repeat % 2]:
            times[name].append(step_seconds(model, name, batch, chunked_loss)[:2])
    return times, losses


def synthetic_rows(conversations, vocab_size, device="cpu"):
    """Packed rows of random token ids: `conversations` lists each row's conversation lengths (rows of equal total)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    length = sum(conversations[0])
    ids = torch.randint(0, vocab_size, (len(conversations), length), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in conversations])
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}
    return {key: value.to(device) for key, value in batch.items()}


def main(argv=None):
    parser = real_rows_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from bench.lora_step_ab import packed_batch
    from medicalgpt.train.chunked_loss import add_chunked_lm_head
    from medicalgpt.train.packed_attention import PACKED_SDPA, row_pieces, sequence_starts

    torch.set_num_threads(args.threads)
    batch = packed_batch(args.model, args.data, args.rows, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    add_chunked_lm_head(model)
    model.train()
    times, losses = interleaved_steps(model, batch, args.repeats)
    cpu = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
    wall = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
    result = {
        "tokens": int(batch["input_ids"].numel()),
        "conversations": len(row_pieces(sequence_starts(batch["position_ids"], args.rows))),
        "threads": args.threads,
        "cpu_s_median": {k: round(v, 3) for k, v in cpu.items()},
        "wall_s_median": {k: round(v, 3) for k, v in wall.items()},
        "cpu_s_all": {k: [round(t[0], 3) for t in v] for k, v in times.items()},
        "saves_cpu": round(1 - cpu[PACKED_SDPA] / cpu["sdpa"], 4),
        "loss": losses,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
