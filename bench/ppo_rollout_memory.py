"""Peak memory of PPO's rollout log-probs (policy and reference) on a Qwen-vocabulary model, old code against new.

    python -m bench.ppo_rollout_memory [--batches 4 16 64] [--micro_batch 4] [--query_length 48]
        [--response_length 16] [--dtype bfloat16]                  # from the repository root; CPU, ~1 minute

The model is a 2-layer Qwen2 with hidden size 64 and Qwen2.5's vocabulary (151,936 tokens), randomly initialised:
at this vocabulary the logits, not the layers, dominate a rollout's memory, as on the real 7B models.

- old: the code before medicalgpt/rl/rollout.py: one forward of the whole rollout batch through the policy and the
  reference, all positions' logits kept, then a float32 log_softmax over the vocabulary of every response token.
- new: `rollout.response_logprobs`, as PPOTrainer runs it: `--micro_batch` sequences per forward, logits only for
  the response positions (`logits_to_keep`), reduced at once to one log-prob per token by `ppo.selected_logprobs`.

Peak is the process's resident-memory high-water mark (reset through /proc/self/clear_refs before each run) above
its resident memory at the start of the run. Prints one JSON object; both versions' log-probs are checked equal.
"""

import argparse
import functools
import gc
import json
import time

import torch

QWEN_VOCAB = 151936


def resident_mb(field):
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory(function):
    """(result, seconds, MB of peak resident memory above the start) of function()."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident size
    start_mb, start = resident_mb("VmRSS"), time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    return result, seconds, resident_mb("VmHWM") - start_mb


def build_model(dtype, seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()


def old_logprobs(policy, reference, input_ids, attention_mask, responses, temperature):
    """The rollout log-probs as ppo_trainer.py computed them before micro-batching (commit 356cdac)."""
    context = input_ids.shape[1] - responses.shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    ref_logits = reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def logprobs_from_logits(logits):
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logprobs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)

    return logprobs_from_logits(logits[:, context - 1 : -1]), logprobs_from_logits(ref_logits[:, context - 1 : -1])


def new_logprobs(policy, reference, input_ids, attention_mask, responses, temperature, micro_batch):
    from medicalgpt.rl import rollout
    from medicalgpt.rl.models import causal_logits

    return tuple(
        rollout.response_logprobs(functools.partial(causal_logits, model), input_ids, attention_mask, responses,
                                  temperature, micro_batch)[0]
        for model in (policy, reference)
    )  # fmt: skip


def rollout_batch(batch, query_length, response_length, seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, QWEN_VOCAB, (batch, query_length + response_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, : query_length // 2] = 0  # every other query left-padded to half its length
    return input_ids, attention_mask, input_ids[:, query_length:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--query_length", type=int, default=48)
    parser.add_argument("--response_length", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    policy, reference = build_model(args.dtype, 0), build_model(args.dtype, 1)
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            inputs = rollout_batch(batch, args.query_length, args.response_length, batch)
            old, old_s, old_mb = peak_memory(functools.partial(old_logprobs, policy, reference, *inputs,
                                                               args.temperature))  # fmt: skip
            new, new_s, new_mb = peak_memory(functools.partial(new_logprobs, policy, reference, *inputs,
                                                               args.temperature, args.micro_batch))  # fmt: skip
            for old_values, new_values in zip(old, new):
                torch.testing.assert_close(new_values, old_values, atol=1e-4, rtol=1e-4)
            rows.append({"rollout_batch": batch, "old_peak_mb": round(old_mb), "new_peak_mb": round(new_mb),
                         "old_seconds": round(old_s, 3), "new_seconds": round(new_s, 3)})  # fmt: skip
            del old, new
    print(json.dumps({
        "benchmark": "ppo_rollout_memory", "vocab_size": QWEN_VOCAB, "dtype": args.dtype,
        "micro_batch": args.micro_batch, "query_length": args.query_length,
        "response_length": args.response_length, "device": "cpu", "rows": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
