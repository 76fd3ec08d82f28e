"""PPO on a real instruct model (SmolLM2-135M-Instruct, CPU): held-out reward and KL per update, as JSON.

    make real-model        # once: builds models/smollm2-135m-instruct offline
    python -m bench.ppo_real_model [--model models/smollm2-135m-instruct] [--updates 8] [--work_dir DIR]

A LoRA reward model is trained on the real model to prefer "see a doctor" answers to home remedies on 16 medical
questions; PPO (LoRA policy on the same model, critic from the reward model) then trains on those 16 questions and
is evaluated, by sampling, on 8 others. The model's tokenizer pads with its end-of-turn token (pad == stop), and
its own chat template renders the conversations: the reward model is read as trained, where a plain
AutoModelForSequenceClassification reads it. Several minutes on 2 cores.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from bench.ppo_reward_curve import QUIET, write_jsonl

QUESTIONS = [
    f"{complaint} What should I do?"
    for complaint in (
        "I have had a headache for three days.", "My child has a fever of 39 degrees.", "I keep coughing at night.",
        "My stomach hurts after every meal.", "My lower back hurts when I stand up.", "I cannot sleep at night.",
        "My tooth hurts with cold water.", "My nose has been blocked for a week.", "My eyes are dry and itchy.",
        "My throat is sore and swollen.", "I have had diarrhoea since yesterday.", "I have a red rash on my arm.",
        "My knee is swollen after running.", "I feel dizzy when I stand up.", "My ear hurts and I hear less.",
        "I have chest pain when I climb stairs.", "My ankle hurts after I twisted it.", "I feel tired all the time.",
        "My hands are numb in the morning.", "I have a burning feeling when I urinate.",
        "My gums bleed when I brush my teeth.", "I have a lump in my neck.", "My heart beats very fast sometimes.",
        "I lost weight without trying.",
    )
]  # fmt: skip
CHOSEN = "Please see a doctor soon, who can examine you and find the cause."
REJECTED = "Just drink some hot water and rest, it will go away by itself."


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--eval_steps", type=int, default=4)
    parser.add_argument("--work_dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ppo_training
    import reward_modeling

    work = args.work_dir or tempfile.mkdtemp(prefix="ppo-real-bench-")
    train_q, held_out = QUESTIONS[:16], QUESTIONS[16:]
    pairs = [{"prompt": q, "chosen": CHOSEN, "rejected": REJECTED} for q in train_q]
    pairs = write_jsonl(f"{work}/pairs.jsonl", pairs)
    prompts = write_jsonl(f"{work}/prompts/train.jsonl", [{"instruction": q, "output": CHOSEN} for q in train_q])
    write_jsonl(f"{work}/prompts/eval/eval.jsonl", [{"instruction": q, "output": CHOSEN} for q in held_out * 2])
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs; stdout is for the JSON
        if not os.path.isfile(f"{work}/rm/adapter_config.json"):  # a --work_dir's reward model is reused
            reward_modeling.main(["--model_name_or_path", args.model, "--train_file_dir", pairs, "--do_train",
                                  "--use_peft", "True", "--learning_rate", "1e-3", "--num_train_epochs", "4",
                                  "--per_device_train_batch_size", "8", "--save_strategy", "no",
                                  "--output_dir", f"{work}/rm", *QUIET])  # fmt: skip
        rm_seconds = time.time() - start
        ppo_training.main(["--sft_model_path", args.model, "--reward_model_path", f"{work}/rm",
                           "--train_file_dir", prompts, "--validation_file_dir", f"{work}/prompts/eval", "--do_train",
                           "--use_peft", "True", "--lora_rank", "16", "--learning_rate", "3e-4",
                           "--response_length", "32", "--per_device_train_batch_size", "8",
                           "--per_device_eval_batch_size", "8", "--local_rollout_forward_batch_size", "4",
                           "--total_episodes", str(8 * args.updates), "--num_ppo_epochs", "2",
                           "--missing_eos_penalty", "1.0", "--eval_strategy", "steps",
                           "--eval_steps", str(args.eval_steps), "--eval_on_start", "True", "--logging_steps", "1",
                           "--save_strategy", "no",
                           "--output_dir", f"{work}/ppo", *QUIET])  # fmt: skip
    with open(f"{work}/ppo/trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    keys = ("score", "kl", "entropy", "response_length", "stop_rate")
    print(json.dumps({
        "model": args.model, "rm_seconds": round(rm_seconds, 1),
        "ppo_seconds": round(time.time() - start - rm_seconds, 1),
        "per_update": [{"update": e["step"], **{k: e[k] for k in keys}} for e in history if "score" in e],
        "held_out_eval_score": [{"update": e["step"], "score": e["eval_score"]} for e in history if "eval_score" in e],
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
