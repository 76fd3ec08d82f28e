"""Reward modeling, DPO and ORPO: exact pair tokenisation, the tutorial's commands, and evidence of learning."""

import json
import sys

import pytest
import torch

import dpo_training
import orpo_training
import reward_modeling
from medicalgpt.errors import DataValidationError
from medicalgpt.processors.preference import tokenize_preference
from medicalgpt.templates import get_conv_template
from tests.helpers import FAST_FLAGS, REPO, global_step, logprob_margin, pair_tokens, run, write_doctor_data

RECORD = {
    "messages": [{"role": "user", "content": "小孩发烧怎么办？"}],
    "system": None,
    "tools": None,
    "chosen": "先测体温，超过三天请就医。",
    "rejected": "不用管。",
}


@pytest.fixture(scope="module")
def doctor_data(tmp_path_factory):
    return write_doctor_data(tmp_path_factory.mktemp("doctor"))


def test_pair_tokens_follow_the_template_and_end_with_the_stop_token(tiny_tokenizer):
    out = tokenize_preference(RECORD, get_conv_template("qwen"), tiny_tokenizer, 1024, 512)
    official = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "小孩发烧怎么办？"}], tokenize=False, add_generation_prompt=True
    )
    assert out["prompt_ids"] == tiny_tokenizer(official)["input_ids"]
    assert tiny_tokenizer.decode(out["chosen_ids"]) == "先测体温，超过三天请就医。<|im_end|>"
    assert tiny_tokenizer.decode(out["rejected_ids"]) == "不用管。<|im_end|>"
    assert out["truncated"] is False


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_answers(tiny_tokenizer):
    full = tokenize_preference(RECORD, get_conv_template("qwen"), tiny_tokenizer, 1024, 512)
    cut = tokenize_preference(RECORD, get_conv_template("qwen"), tiny_tokenizer, 5, 3)
    assert cut["prompt_ids"] == full["prompt_ids"][-5:]
    assert cut["chosen_ids"] == full["chosen_ids"][:3] and cut["rejected_ids"] == full["rejected_ids"][:3]
    assert cut["truncated"] is True


def tutorial_argv(stage, model_dir, data_dir, output_dir):
    """The tutorial's RM / DPO / ORPO commands, model path pointed at a local model, --max_steps 2."""
    common = [
        "--model_name_or_path", model_dir, "--train_file_dir", data_dir, "--validation_file_dir", data_dir,
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8", "--do_train",
        "--use_peft", "True", "--max_train_samples", "1000", "--max_eval_samples", "10", "--max_source_length", "1024",
        "--output_dir", output_dir, "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.05", "--torch_dtype", "bfloat16", "--device_map", "auto", "--report_to", "tensorboard",
        "--gradient_checkpointing", "True", "--max_steps", "2",
    ]  # fmt: skip
    if stage == "rm":
        return common + [
            "--per_device_eval_batch_size", "4", "--seed", "42", "--num_train_epochs", "1",
            "--learning_rate", "2e-5", "--warmup_ratio", "0.05", "--weight_decay", "0.001",
            "--logging_strategy", "steps", "--logging_steps", "10", "--eval_steps", "50",
            "--eval_strategy", "steps", "--save_steps", "500", "--save_strategy", "steps",
            "--save_total_limit", "3", "--max_target_length", "256", "--overwrite_output_dir",
            "--ddp_timeout", "30000",
            "--logging_first_step", "True", "--bf16", "--ddp_find_unused_parameters", "False",
            "--remove_unused_columns", "False",
        ]  # fmt: skip
    extra = ["--template_name", "qwen", "--per_device_eval_batch_size", "1", "--do_eval", "--eval_steps", "20"]
    extra += ["--save_steps", "50", "--max_target_length", "512", "--bf16", "True", "--cache_dir", "./cache"]
    if stage == "dpo":
        extra += ["--fp16", "False", "--remove_unused_columns", "False"]
    return common + extra


def test_tutorial_rm_command(tiny_model_dir, sft_adapter_dir, tmp_path):
    from peft import PeftConfig

    out = tmp_path / "outputs-rm-qwen-v1"
    reward_modeling.main(tutorial_argv("rm", sft_adapter_dir, str(REPO / "data" / "reward"), str(out)))
    assert global_step(out) == 2
    config = PeftConfig.from_pretrained(out)
    assert config.task_type == "SEQ_CLS" and config.base_model_name_or_path == sft_adapter_dir
    from safetensors.torch import load_file

    assert any("score" in name for name in load_file(out / "adapter_model.safetensors")), "the head is saved"


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_tutorial_dpo_and_orpo_commands_start_from_the_sft_adapter(stage, sft_adapter_dir, tmp_path):
    out = tmp_path / f"outputs-{stage}-qwen-v1"
    main = dpo_training.main if stage == "dpo" else orpo_training.main
    main(tutorial_argv(stage, sft_adapter_dir, str(REPO / "data" / "reward"), str(out)))
    assert global_step(out) == 2
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == sft_adapter_dir
    assert (out / "eval_results.json").exists()


@pytest.mark.parametrize("main", [reward_modeling.main, dpo_training.main, orpo_training.main])
def test_malformed_preference_file_stops_before_anything_is_written(main, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "头痛？", "chosen": "休息", "rejected": "休息"}\n{"prompt": "x", "chosen": ""}\n')
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as error:
        main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(bad), "--do_train",
              "--output_dir", str(out), *FAST_FLAGS])  # fmt: skip
    assert f"{bad}:2: error:" in str(error.value)
    assert not out.exists()


def pairwise_accuracy(model_dir, data_dir, tokenizer):
    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model

    model = load_model(ModelArguments(model_name_or_path=str(model_dir)), **reward_model_kwargs())
    model.config.pad_token_id = tokenizer.pad_token_id
    correct = total = 0
    for pair in pair_tokens(data_dir, tokenizer):
        with torch.no_grad():
            chosen = model(torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])).logits.item()
            rejected = model(torch.tensor([pair["prompt_ids"] + pair["rejected_ids"]])).logits.item()
        correct += chosen > rejected
        total += 1
    return correct / total


def reward_model_kwargs():
    from transformers import AutoModelForSequenceClassification

    return {"model_class": AutoModelForSequenceClassification, "num_labels": 1}


def test_reward_model_learns_to_prefer_seeing_a_doctor(tiny_model_dir, tiny_tokenizer, doctor_data, tmp_path):
    train, held_out = doctor_data
    out = tmp_path / "rm"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(train), "--validation_file_dir",
            str(held_out), "--do_train", "--do_eval", "--template_name", "qwen", "--use_peft", "True",
            "--lora_rank", "16", "--learning_rate", "5e-3", "--num_train_epochs", "6", "--logging_steps", "5",
            "--per_device_train_batch_size", "8", "--output_dir", str(out), "--save_strategy", "no",
            *FAST_FLAGS]  # fmt: skip
    reward_modeling.main(argv)
    metrics = json.loads((out / "eval_results.json").read_text())
    before = pairwise_accuracy(tiny_model_dir, held_out, tiny_tokenizer)
    after = pairwise_accuracy(out, held_out, tiny_tokenizer)
    print(f"held-out pairwise accuracy: {before:.2f} -> {after:.2f}")
    assert 0.25 <= before <= 0.75, "an untrained head should be near chance"
    assert after >= 0.9 and metrics["eval_accuracy"] >= 0.9


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_alignment_raises_the_held_out_chosen_minus_rejected_margin(stage, tiny_model_dir, tiny_tokenizer, doctor_data,
                                                                    tmp_path):  # fmt: skip
    train, held_out = doctor_data
    out = tmp_path / stage
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(train), "--do_train",
            "--template_name", "qwen", "--use_peft", "True", "--lora_rank", "16", "--learning_rate", "5e-3",
            "--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--output_dir", str(out),
            "--save_strategy", "no", "--logging_steps", "5", *FAST_FLAGS]  # fmt: skip
    if stage == "orpo":
        argv += ["--orpo_beta", "1.0"]
    (dpo_training.main if stage == "dpo" else orpo_training.main)(argv)
    before = logprob_margin(tiny_model_dir, held_out, tiny_tokenizer)
    after = logprob_margin(out, held_out, tiny_tokenizer)
    print(f"{stage}: held-out log-prob margin {before:.2f} -> {after:.2f}")
    assert after > before + 3.0, (before, after)


def test_reward_modeling_under_torchrun_halves_the_steps(tiny_model_dir, doctor_data, tmp_path):
    train, _ = doctor_data
    steps = {}
    for nproc in (1, 2):
        out = tmp_path / f"rm-{nproc}"
        argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(train), "--do_train",
                "--use_peft", "True", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
                "--output_dir", str(out), "--save_strategy", "no", *FAST_FLAGS]  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        result = run([*launcher, "--master_port", str(29600 + nproc), "reward_modeling.py", *argv])
        assert result.returncode == 0, result.stderr[-3000:]
        steps[nproc] = global_step(out)
    assert steps[2] * 2 == steps[1]
