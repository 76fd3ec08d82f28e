"""Every stage under DeepSpeed ZeRO-2 and ZeRO-3 in 2 CPU processes (tests/deepspeed_cpu.py), chained on a bf16
checkpoint as released models are: PT -> SFT -> RM, DPO, ORPO -> PPO, GRPO (SFT + RM), and distillation of the SFT
model from a teacher whose vocabulary is padded (as Qwen2.5-7B's is against 0.5B's). Each output is loaded as the next
stage or inference loads it, and differs from what it was trained from. 2 steps each, tiny models, 8 launches per
ZeRO stage: 6 minutes each measured on 2 cores shared with other jobs (load average 12)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from medicalgpt.args import ModelArguments
from medicalgpt.model.loader import load_model
from tests.helpers import FAST_FLAGS, deepspeed_run, lora_b_max, needs_deepspeed, write_jsonl

pytestmark = [pytest.mark.multiprocess, needs_deepspeed]

STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The tiny model in bf16, a teacher with 64 padded vocabulary rows, and a little data for every stage."""
    root = tmp_path_factory.mktemp("deepspeed-stages")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(root / "base-bf16")
    model.resize_token_embeddings(model.config.vocab_size + 64, mean_resizing=False)
    model.save_pretrained(root / "teacher-padded")
    for folder in ("base-bf16", "teacher-padded"):
        tokenizer.save_pretrained(root / folder)
    qa = [(f"问题{i}：发烧{i}天怎么办？", f"回答{i}：多喝水，休息，不退烧就去医院。") for i in range(8)]
    (root / "pt.txt").write_text("\n".join(q + a for q, a in qa) * 4, encoding="utf-8")
    write_jsonl(root / "sft.jsonl", [{"instruction": q, "output": a} for q, a in qa])
    write_jsonl(root / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "多喝热水。"} for q, a in qa])
    return root


def stage(script, argv, port, zero):
    result = deepspeed_run(script, [*argv, *STEPS, *FAST_FLAGS], port, config=f"configs/ds_zero{zero}.json")
    assert result.returncode == 0, f"{script}:\n{result.stderr[-3000:]}"
    return result


def max_change(before, after):
    """Largest change of any weight the two models share (an adapter dir is merged onto its base first)."""
    old, new = (load_model(ModelArguments(model_name_or_path=str(path))).state_dict() for path in (before, after))
    return max((new[name].float() - weight.float()).abs().max().item() for name, weight in old.items())


def saved_dtype(folder):
    return json.loads((folder / "config.json").read_text())["dtype"]


@pytest.mark.parametrize("zero", [2, 3])
def test_every_stage_under_deepspeed_saves_what_the_next_stage_loads(zero, setup, tmp_path):
    port = 29800 + 20 * zero
    base, out = setup / "base-bf16", {name: tmp_path / name for name in ("pt", "sft", "rm", "dpo", "orpo", "ppo")}
    common = ["--template_name", "qwen", "--do_train", "--learning_rate", "1e-2"]

    stage("pretraining.py", ["--model_name_or_path", str(base), "--train_file_dir", str(setup / "pt.txt"),
                             "--block_size", "32", "--output_dir", str(out["pt"]), *common], port, zero)  # fmt: skip
    stage("supervised_finetuning.py", ["--model_name_or_path", str(out["pt"]), "--train_file_dir",
                                       str(setup / "sft.jsonl"), "--packing", "False", "--output_dir",
                                       str(out["sft"]), *common], port + 1, zero)  # fmt: skip
    for name in ("pt", "sft"):  # full training: float32 weights in training, saved in the checkpoint's bf16
        assert saved_dtype(out[name]) == "bfloat16"
    assert max_change(base, out["pt"]) > 1e-3 and max_change(out["pt"], out["sft"]) > 1e-3

    lora = ["--model_name_or_path", str(out["sft"]), "--train_file_dir", str(setup / "pairs.jsonl"), "--use_peft",
            "True", *common]  # fmt: skip
    for i, (script, name) in enumerate((("reward_modeling.py", "rm"), ("dpo_training.py", "dpo"),
                                        ("orpo_training.py", "orpo"))):  # fmt: skip
        stage(script, [*lora, "--output_dir", str(out[name])], port + 2 + i, zero)
        assert lora_b_max(out[name]) > 1e-4, f"{script}: the adapter trained"
    reward_model = load_model(ModelArguments(model_name_or_path=str(out["rm"])),
                              model_class=AutoModelForSequenceClassification, num_labels=1)  # fmt: skip
    assert reward_model.score.weight.abs().max() > 0
    assert max_change(out["sft"], out["dpo"]) > 1e-4 and max_change(out["sft"], out["orpo"]) > 1e-4

    rl = ["--sft_model_path", str(out["sft"]), "--reward_model_path", str(out["rm"]), "--train_file_dir",
          str(setup / "sft.jsonl"), "--use_peft", "True", "--response_length", "8", *common]  # fmt: skip
    stage("ppo_training.py", [*rl, "--total_episodes", "4", "--num_ppo_epochs", "1", "--output_dir", str(out["ppo"])],
          port + 5, zero)  # fmt: skip
    stage("ppo_training.py", [*rl, "--rl_algorithm", "grpo", "--num_generations", "2", "--output_dir",
                              str(tmp_path / "grpo")], port + 6, zero)  # fmt: skip
    assert max_change(out["sft"], out["ppo"]) > 1e-5 and lora_b_max(tmp_path / "grpo") > 1e-5

    distill = tmp_path / "distill"
    result = stage("distill_training.py", [
        "--model_name_or_path", str(out["sft"]), "--teacher_model_name_or_path", str(setup / "teacher-padded"),
        "--train_file_dir", str(setup / "sft.jsonl"), "--max_length", "64", "--max_prompt_length", "32",
        "--max_new_tokens", "4", "--lmbda", "0", "--output_dir", str(distill), *common,
    ], port + 7, zero)  # fmt: skip
    vocabulary = AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    assert f"vocabulary rows are cut to the student's {vocabulary}" in result.stderr
    assert saved_dtype(distill) == "bfloat16" and max_change(out["sft"], distill) > 1e-3
