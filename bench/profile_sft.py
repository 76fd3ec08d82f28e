"""Where our SFT's CPU time goes on a given model and data: torch.profiler over a few training steps of our defaults
(packing, chunked loss) as bench/sft_throughput.py runs them, with any of our flags added after `--`.

    python bench/profile_sft.py --model models/smollm2-135m-instruct --max_length 1024 --limit 48 --batch_size 2
    python bench/profile_sft.py --max_length 1024 --limit 12 --pick spread --steps 1 --method full
                                                                   # the real-model bench's conversations
    python bench/profile_sft.py --model models/smollm2-135m-instruct --max_length 1024 --limit 48 --batch_size 2 \\
        --method full                                              # full-parameter training

The same conversations, flags and thread pinning as bench/sft_throughput.py's `ours_chunked` row (LoRA on all linear
layers unless overridden), in this process. Prints the profiler's table of the operators with the most CPU time of
their own over --steps steps after the first (forward, backward, optimizer, data, logging), then JSON: each
operator's share of that time.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import real_rows_parser  # noqa: E402


def share_table(profiler, top):
    """The `top` operators by own CPU time, each with its share of the profiled CPU time, in percent."""
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {e.key: {"percent": round(100 * e.self_cpu_time_total / total, 2), "calls": e.count} for e in rows}


def main(argv=None):
    parser = real_rows_parser(__doc__)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps, after the first")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pick", choices=("first", "spread"), default="first", help="as bench/sft_throughput.py's")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    args, extra = parser.parse_known_args(argv)
    extra = extra[1:] if extra[:1] == ["--"] else extra
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    import supervised_finetuning
    from bench.sft_throughput import (
        OURS,
        SYSTEM_PROMPT,
        select_conversations,
        shared_flags,
        with_distinct_pad_token,
        write_data,
    )

    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "2")))
    work = tempfile.mkdtemp(prefix="profile-sft-")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "cache")
    model = with_distinct_pad_token(os.path.abspath(args.model), os.path.join(work, "model"))
    lines, _ = select_conversations(os.path.abspath(args.data), model, args.max_length, args.limit, args.pick)
    data_dir = write_data(lines, work)
    flags = shared_flags(args, model, data_dir, os.path.join(work, "out"), args.method)
    argv = [*flags, "--system_prompt", SYSTEM_PROMPT]
    argv += [*OURS["ours_chunked"], *extra]

    profiler, seen = profile(activities=[ProfilerActivity.CPU]), {"steps": 0}
    training_step = Trainer.training_step

    def profiled_step(self, *step_args, **kwargs):  # steps 2 .. steps + 1: the first one warms up
        seen["steps"] += 1
        if seen["steps"] == 2:
            profiler.start()
        if seen["steps"] == args.steps + 2:
            profiler.stop()
        return training_step(self, *step_args, **kwargs)

    Trainer.training_step = profiled_step
    try:
        supervised_finetuning.main(argv)
    finally:
        Trainer.training_step = training_step
    if seen["steps"] < args.steps + 2:
        if seen["steps"] < 2:
            raise SystemExit(f"only {seen['steps']} training steps: raise --limit or lower --batch_size")
        profiler.stop()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
    profiled = min(seen["steps"] - 1, args.steps)
    print(json.dumps({"argv_extra": extra, "profiled_steps": profiled, "top": share_table(profiler, args.top)}))


if __name__ == "__main__":
    main()
