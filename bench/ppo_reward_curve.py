"""PPO on a tiny model, end to end on CPU: prints the reward per update as JSON, so the curve can be read.

    python -m bench.ppo_reward_curve [--updates 12] [--work_dir /tmp/ppo-bench]     # from the repository root

An SFT policy learns to answer each of 12 questions in two ways about equally often ("请去看医生。" / "多喝热水。");
a LoRA reward model learns to prefer the first; PPO (LoRA policy, critic from the reward model) then trains on
8 questions and is evaluated, by sampling, on the other 4.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

QUESTIONS = [f"{s}怎么办？" for s in "头痛 咳嗽 发烧 胃痛 腰痛 失眠 牙痛 鼻塞 眼睛干 喉咙痛 腹泻 皮疹".split()]
GOOD, BAD = "请去看医生。", "多喝热水。"
QUIET = ["--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none", "--disable_tqdm", "True"]


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def build_stages(work):
    import reward_modeling
    import supervised_finetuning
    from medicalgpt.quickstart.tiny_model import build_tiny_model

    base = build_tiny_model(os.path.join(work, "tiny"))
    sft_data = write_jsonl(
        f"{work}/sft.jsonl", [{"instruction": q, "output": a} for q in QUESTIONS for a in (GOOD, BAD)]
    )
    pairs = write_jsonl(f"{work}/pairs.jsonl", [{"prompt": q, "chosen": GOOD, "rejected": BAD} for q in QUESTIONS])
    common = ["--template_name", "qwen", "--do_train", "--save_strategy", "no", *QUIET]
    supervised_finetuning.main(["--model_name_or_path", base, "--train_file_dir", sft_data, "--num_train_epochs", "20",
                                "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                                "--output_dir", f"{work}/sft", *common])  # fmt: skip
    reward_modeling.main(["--model_name_or_path", base, "--train_file_dir", pairs, "--use_peft", "True",
                          "--learning_rate", "5e-3", "--num_train_epochs", "8", "--per_device_train_batch_size", "4",
                          "--output_dir", f"{work}/rm", *common])  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--work_dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ppo_training

    work = args.work_dir or tempfile.mkdtemp(prefix="ppo-bench-")
    with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs; stdout is for the JSON
        build_stages(work)
    prompts = write_jsonl(f"{work}/prompts/train.jsonl", [{"instruction": q, "output": GOOD} for q in QUESTIONS[:8]])
    write_jsonl(f"{work}/prompts/eval/eval.jsonl", [{"instruction": q, "output": GOOD} for q in QUESTIONS[8:] * 4])
    argv = ["--sft_model_path", f"{work}/sft", "--reward_model_path", f"{work}/rm", "--template_name", "qwen",
            "--train_file_dir", prompts, "--validation_file_dir", f"{work}/prompts/eval", "--do_train",
            "--use_peft", "True", "--lora_rank", "16", "--learning_rate", "2e-3", "--response_length", "12",
            "--per_device_train_batch_size", "8", "--total_episodes", str(8 * args.updates),
            "--num_ppo_epochs", "2", "--missing_eos_penalty", "1.0", "--eval_strategy", "steps",
            "--eval_steps", "4", "--eval_on_start", "True", "--logging_steps", "1", "--save_strategy", "no",
            "--output_dir", f"{work}/ppo", *QUIET]  # fmt: skip
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        ppo_training.main(argv)
    with open(f"{work}/ppo/trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    keys = ("score", "kl", "entropy", "response_length", "stop_rate", "policy_loss", "value_loss")
    print(json.dumps({
        "ppo_seconds": round(time.time() - start, 1),
        "per_update": [{"update": e["step"], **{k: e[k] for k in keys}} for e in history if "score" in e],
        "held_out_eval_score": [{"update": e["step"], "score": e["eval_score"]} for e in history if "eval_score" in e],
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
