"""A/B of PPO's loss step on a real model: the vocabulary head on the response positions only (now) or on every
position, sliced afterwards (before); interleaved repeats, wall and process CPU seconds, as JSON.

    python -m bench.ppo_loss_head_ab [--model models/smollm2-135m-instruct] [--repeats 5] \\
        [--batch 8] [--prompt_length 45] [--response_length 64]

One micro-batch of PPO's optimisation (medicalgpt/rl/ppo_loss.py: policy and critic forward, clipped losses,
backward) on LoRA rank-8 adapters over the model as policy and as critic, the shapes of bench/rl_time_split.py's
PPO update (its prompts render to ~45 tokens with SmolLM2's template). Both variants compute bit-identical losses
and gradients (tests/rl/test_rollout.py); only the time differs.
"""

import argparse
import json
import os
import time
import types

import torch

from bench.common import load_average, median_and_spread


def build_models(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from medicalgpt.rl.models import PolicyAndValue, disable_dropout

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, target_modules="all-linear")
    )
    critic = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    critic.config.pad_token_id = critic.config.eos_token_id
    critic = get_peft_model(critic, LoraConfig(r=8, target_modules="all-linear", task_type="SEQ_CLS"))
    model = PolicyAndValue(policy, critic)
    disable_dropout(model)
    return model


def rollout_batch(vocabulary, batch, prompt_length, response_length):
    generator = torch.Generator().manual_seed(0)
    width = prompt_length + response_length
    input_ids = torch.randint(10, vocabulary, (batch, width), generator=generator)
    attention_mask = torch.ones(batch, width, dtype=torch.long)
    attention_mask[::2, : prompt_length // 4] = 0  # left padding on every other row, as rollouts have
    shape = (batch, response_length)
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, responses=input_ids[:, prompt_length:],
        mask=torch.ones(shape), logprobs=-torch.rand(shape, generator=generator) * 5,
        values=torch.randn(shape, generator=generator), advantages=torch.randn(shape, generator=generator),
        returns=torch.randn(shape, generator=generator), context=prompt_length,
    )  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=45)
    parser.add_argument("--response_length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from medicalgpt.rl.ppo_loss import ppo_loss

    model = build_models(args.model)
    batch = rollout_batch(model.config.vocab_size, args.batch, args.prompt_length, args.response_length)
    config = types.SimpleNamespace(temperature=1.0, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)

    def every_position(input_ids, attention_mask, logits_to_keep):  # before: the head on all positions, sliced
        logits, values = model(input_ids, attention_mask)
        return logits[:, -logits_to_keep:], values

    variants = {"response_positions": model, "every_position": every_position}
    times = {name: {"wall": [], "cpu": []} for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, forward in variants.items():
            model.zero_grad(set_to_none=True)
            wall, cpu = time.perf_counter(), time.process_time()
            loss, _ = ppo_loss(forward, batch, config)
            loss.backward()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if repeat:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    result = {"model": args.model, "batch": args.batch, "prompt_length": args.prompt_length,
              "response_length": args.response_length, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "load_average": load_average()}  # fmt: skip
    for name, measured in times.items():
        for kind in ("wall", "cpu"):
            median, low, high = median_and_spread(measured[kind])
            result[f"{name}_{kind}_s"] = {"median": round(median, 3), "min": round(low, 3), "max": round(high, 3)}
    for kind in ("wall", "cpu"):
        before, after = result[f"every_position_{kind}_s"]["median"], result[f"response_positions_{kind}_s"]["median"]
        result[f"speedup_{kind}"] = round(before / after, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
