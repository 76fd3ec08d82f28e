"""RL's time split on a real model: where one PPO update, one GRPO step and one RLOO step spend their time, as JSON.

    make real-model        # once: builds models/smollm2-135m-instruct offline
    python -m bench.rl_time_split [--model models/smollm2-135m-instruct] [--trainers ppo,grpo,rloo] \\
        [--response_length 64] [--peak peak.json | --peak_gflops G]

All three run through ppo_training.main on the same 8 medical questions, 2 completions per question (PPO gets each
question twice: it samples one response per prompt), at most --response_length new tokens, LoRA rank 8 on the
policy, each trainer's defaults otherwise (PPO: 4 PPO epochs over the rollout, critic from the reward model; GRPO:
no reference model (beta 0), one pass; RLOO: reference by disabling the adapter, beta 0.05, one pass). The reward
model is --model read as a sequence classifier (a fresh score head: its values do not matter for time).

Parts (exclusive wall and CPU seconds: a part nested in another is not counted twice):
  generation      sampling the completions (`PPOTrainer.generate`, trl's `_generate`)
  scoring         the reward model (`score_sequences`, trl's `_calculate_rewards`)
  old_policy      no-grad forwards for the rollout's log-probs (PPO: policy and critic together)
  reference       no-grad forwards of the reference policy (the adapter disabled)
  optimisation    loss forward + backward + optimizer step (PPO: all PPO epochs)
  other           the rest of the step (rewards, advantages, padding, logging)
Only the methods are wrapped, here in the bench; the package is not changed to be measured.

FLOPs (the convention, until bench/flops.py is wired in): a forward costs 2N per token, N the weights that
multiply (the transformer body; the vocabulary head only at positions whose logits the algorithm uses);
the backward of a LoRA model 2N per token (input gradients; the adapters' own weight gradients, < 1%, are left out).
Attention's sequence-length term is left out (< 3% at these lengths). MFU = counted FLOPs / seconds / the peak:
--peak names bench/peak.py's JSON (its "peak_for_mfu", the machine's best float32 GFLOP/s at the model's shapes), as
bench/sft_throughput.py --peak does; --peak_gflops gives a number instead.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch

from bench.common import load_average
from bench.ppo_real_model import CHOSEN, QUESTIONS
from bench.ppo_reward_curve import QUIET, write_jsonl

PARTS = ("generation", "scoring", "old_policy", "reference", "optimisation", "other")


class PartTimer:
    """Exclusive wall and CPU seconds per part: entering a part pauses the one it is nested in."""

    def __init__(self):
        self.wall = dict.fromkeys(PARTS, 0.0)
        self.cpu = dict.fromkeys(PARTS, 0.0)
        self.tokens = dict.fromkeys(PARTS, 0)
        self.flops = dict.fromkeys(PARTS, 0.0)
        self.stack = []
        self.undo = []  # (owner, name, original) of every wrapped attribute

    def _charge(self):
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        if self.stack:
            part = self.stack[-1][0]
            self.wall[part] += now_wall - self.stack[-1][1]
            self.cpu[part] += now_cpu - self.stack[-1][2]
        return now_wall, now_cpu

    def push(self, part):
        now_wall, now_cpu = self._charge()
        if self.stack:
            self.stack[-1] = (self.stack[-1][0], now_wall, now_cpu)
        self.stack.append((part, now_wall, now_cpu))

    def pop(self):
        now_wall, now_cpu = self._charge()
        self.stack.pop()
        if self.stack:
            self.stack[-1] = (self.stack[-1][0], now_wall, now_cpu)

    @contextlib.contextmanager
    def part(self, name):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def count(self, part, tokens, flops):
        self.tokens[part] += int(tokens)
        self.flops[part] += float(flops)

    def report(self, peak_gflops):
        total_wall = sum(self.wall.values())
        rows = []
        for part in PARTS:
            wall = self.wall[part]
            rows.append({
                "part": part, "wall_s": round(wall, 2), "cpu_s": round(self.cpu[part], 2),
                "share": round(wall / total_wall, 3) if total_wall else None, "tokens": self.tokens[part],
                "tokens_per_s": round(self.tokens[part] / wall, 1) if wall and self.tokens[part] else None,
                "gflop": round(self.flops[part] / 1e9, 1),
                "mfu": round(self.flops[part] / wall / (peak_gflops * 1e9), 3) if wall and peak_gflops else None,
            })  # fmt: skip
        return {"total_wall_s": round(total_wall, 2), "total_cpu_s": round(sum(self.cpu.values()), 2), "parts": rows}


def wrap(owner, name, timer, part, counter=None):
    """Replaces owner.name by a wrapper that runs it as `part` (a callable: part chosen per call) and counts it."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        chosen = part(*args, **kwargs) if callable(part) else part
        with timer.part(chosen):
            result = original(*args, **kwargs)
        if counter is not None:
            counter(chosen, result, *args, **kwargs)
        return result

    timer.undo.append((owner, name, original))
    setattr(owner, name, timed)


class ModelFlops:
    """FLOPs of the model's forwards: 2 x body weights per token, 2 x head weights per position whose logits count."""

    def __init__(self, model_dir):
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        embedding = model.get_input_embeddings().weight.numel()
        self.body = sum(p.numel() for n, p in model.model.named_parameters()) - embedding
        self.head = model.get_output_embeddings().weight.numel()

    def forward(self, tokens, logit_positions=0):
        return 2 * self.body * tokens + 2 * self.head * logit_positions


def ppo_instruments(trainer, timer, flops, config):
    """Wraps the PPO trainer's rollout pieces and its optimisation (methods of this instance, and the two functions
    its module calls by name)."""
    from medicalgpt.rl import ppo_math, rollout
    from medicalgpt.rl import trainer as trainer_module

    def count_generation(part, result, prompts, greedy=False):
        queries, query_mask, responses = result
        new = ppo_math.response_mask(responses, trainer.stop_token_ids)[0].sum().item()
        timer.count(part, query_mask.sum().item() + new, flops.forward(query_mask.sum().item() + new, new))

    calls = []  # response_logprobs: a rollout's first call is the policy with the critic, the second the reference

    def logprobs_part(logits_fn, *args, **kwargs):
        calls.append(1)
        return "old_policy" if len(calls) % 2 else "reference"

    def count_logprobs(part, result, logits_fn, input_ids, attention_mask, responses, *args):
        tokens, keep = attention_mask.sum().item(), responses.numel()
        models = 2 if part == "old_policy" else 1  # policy and critic backbones
        timer.count(part, tokens * models, models * flops.forward(tokens) + 2 * flops.head * keep)

    def count_optimisation(part, result, batch):
        tokens, keep = batch["attention_mask"].sum().item() * config.num_ppo_epochs, batch["mask"].sum().item()
        keep *= config.num_ppo_epochs
        timer.count(part, tokens * 2, 2 * (2 * flops.forward(tokens)) + 2 * (2 * flops.head * keep))

    wrap(trainer, "generate", timer, "generation", count_generation)
    wrap(trainer, "score", timer, "scoring")
    wrap(trainer_module, "score_sequences", timer, "scoring", count_scoring(timer, flops))
    wrap(rollout, "response_logprobs", timer, logprobs_part, count_logprobs)
    wrap(trainer, "rollout", timer, "other")
    wrap(trainer, "optimize", timer, "optimisation", count_optimisation)


def count_scoring(timer, flops):
    def count(part, result, model, sequences, *args, **kwargs):
        tokens = sum(map(len, sequences))
        timer.count(part, tokens, flops.forward(tokens))

    return count


def trl_instruments(trainer, timer, flops):
    """Wraps trl's GRPO / RLOO trainer: generation, reward functions, the no-grad log-prob forwards (the first of a
    generation batch is the old policy, the second the reference), the completions' bookkeeping; the rest of the
    optimizer step (callbacks from step begin to step end) is the optimisation."""
    from transformers import TrainerCallback

    from medicalgpt.rl import rewards

    no_grad_calls = []

    def count_generation(part, result, prompts):
        no_grad_calls.clear()
        prompt_tokens, new = sum(map(len, result[0])), sum(map(len, result[1]))
        timer.count(part, prompt_tokens + new, flops.forward(prompt_tokens + new, new))

    def logps_part(*args, **kwargs):
        if torch.is_grad_enabled():
            return "optimisation"
        no_grad_calls.append(1)
        return "old_policy" if len(no_grad_calls) == 1 else "reference"

    def count_logps(part, result, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        tokens, keep = attention_mask.sum().item(), len(input_ids) * logits_to_keep
        passes = 2 if part == "optimisation" else 1  # LoRA backward: the input gradients, 2N a token
        timer.count(part, tokens, passes * flops.forward(tokens, keep))

    class StepWindow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.push("optimisation")

        def on_step_end(self, args, state, control, **kwargs):
            timer.pop()

    wrap(trainer, "_generate", timer, "generation", count_generation)
    wrap(trainer, "_calculate_rewards", timer, "scoring")
    wrap(rewards, "score_sequences", timer, "scoring", count_scoring(timer, flops))
    wrap(trainer, "_get_per_token_logps_and_entropies", timer, logps_part, count_logps)
    wrap(trainer, "_generate_and_score_completions", timer, "other")
    trainer.add_callback(StepWindow())


def trainer_argv(algorithm, args, work):
    common = ["--sft_model_path", args.model, "--reward_model_path", args.model, "--template_name", "smollm2",
              "--do_train", "--use_peft", "True", "--lora_rank", "8", "--learning_rate", "1e-5",
              "--response_length", str(args.response_length), "--per_device_train_batch_size", "8",
              "--gradient_accumulation_steps", "2", "--max_steps", "1", "--seed", "42", "--save_strategy", "no",
              "--logging_steps", "1", "--missing_eos_penalty", "1.0", "--output_dir", f"{work}/{algorithm}",
              *QUIET]  # fmt: skip
    if algorithm == "ppo":
        return [*common, "--train_file_dir", f"{work}/prompts_twice.jsonl", "--temperature", "1.0"]
    return [*common, "--rl_algorithm", algorithm, "--train_file_dir", f"{work}/prompts.jsonl",
            "--num_generations", "2", "--temperature", "1.0"]  # fmt: skip


def measure(algorithm, args, work, flops):
    """One step of `algorithm` through ppo_training.main, its parts timed."""
    import ppo_training

    timer = PartTimer()
    builders = {"ppo": "build_ppo_trainer", "grpo": "build_critic_free_trainer", "rloo": "build_critic_free_trainer"}
    name = builders[algorithm]
    build = getattr(ppo_training, name)

    def instrumented(run, *a, **k):
        trainer = build(run, *a, **k)
        if algorithm == "ppo":
            ppo_instruments(trainer, timer, flops, run.config)
        else:
            trl_instruments(trainer, timer, flops)
        return trainer

    setattr(ppo_training, name, instrumented)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            ppo_training.main(trainer_argv(algorithm, args, work))
    finally:
        setattr(ppo_training, name, build)
        for owner, attribute, original in reversed(timer.undo):
            setattr(owner, attribute, original)
    return timer.report(args.peak_gflops)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--trainers", default="ppo,grpo,rloo")
    parser.add_argument("--response_length", type=int, default=64)
    parser.add_argument("--peak", help="bench/peak.py's JSON file: MFU against its peak_for_mfu")
    parser.add_argument("--peak_gflops", type=float, default=None, help="the peak as a number instead of --peak")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.peak:
        with open(args.peak, encoding="utf-8") as f:
            args.peak_gflops = json.load(f)["peak_for_mfu"]["gflops"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="rl-time-split-")
    records = [{"instruction": q, "output": CHOSEN} for q in QUESTIONS[:8]]
    write_jsonl(f"{work}/prompts.jsonl", records)
    write_jsonl(f"{work}/prompts_twice.jsonl", records + records)
    flops = ModelFlops(args.model)
    result = {
        "model": args.model, "prompts": 8, "completions_per_prompt": 2, "max_new_tokens": args.response_length,
        "threads": torch.get_num_threads(), "peak_gflops": args.peak_gflops, "load_average_start": load_average(),
        "flops_convention": "forward 2N/token (N: body weights; head only where logits are used), LoRA backward "
                            "2N/token; attention's length term left out",
        "trainers": {},
    }  # fmt: skip
    for algorithm in args.trainers.split(","):
        result["trainers"][algorithm] = measure(algorithm, args, work, flops)
        print(json.dumps({algorithm: result["trainers"][algorithm]}), file=sys.stderr, flush=True)
    result["load_average_end"] = load_average()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
