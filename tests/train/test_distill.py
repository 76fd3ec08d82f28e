"""distill_training.py: the data rows, the teacher, and a student whose KL to the teacher falls on held-out prompts."""

import json
import sys

import pytest
import torch

import distill_training
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.errors import UsageError
from medicalgpt.processors.sft import tokenize_conversation
from medicalgpt.templates import get_conv_template
from medicalgpt.train.distill import teacher_kl, tokenize_for_distillation
from tests.helpers import CONVERSATION, FAST_FLAGS, REPO, qa_adapter, run, write_jsonl


def alpaca_lines(start, stop):
    lines = (REPO / "data" / "finetune" / "alpaca_zh.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start:stop]]


def test_each_assistant_turn_is_a_row_with_sfts_ids_and_only_its_answer_marked(tiny_tokenizer):
    template = get_conv_template("qwen")
    rows = tokenize_for_distillation(CONVERSATION, template, tiny_tokenizer, max_length=512, max_prompt_length=256)
    sft = tokenize_conversation(CONVERSATION, template, tiny_tokenizer)
    assert [row["input_ids"] for row in rows] == [sft["input_ids"][: len(rows[0]["input_ids"])], sft["input_ids"]]
    answers = [
        tiny_tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]) for row in rows
    ]
    assert answers == ["先测体温，多喝水。<|im_end|>", "Please see a doctor.<|im_end|>"]
    # the second row's answer is exactly SFT's second learned span, its prompt everything before it
    second, learned = rows[1], [label != IGNORE_INDEX for label in sft["labels"]]
    start = second["completion_mask"].index(1)
    assert second["completion_mask"] == [0] * start + [1] * (len(second["input_ids"]) - start)
    assert all(learned[start:]) and not learned[start - 1] and start > len(rows[0]["input_ids"])
    assert second["prompt"].endswith("<|im_start|>assistant\n") and "先测体温" in second["prompt"]


def test_long_prompts_keep_their_last_tokens_and_answers_their_first(tiny_tokenizer):
    template = get_conv_template("qwen")
    full = tokenize_for_distillation(CONVERSATION, template, tiny_tokenizer, max_length=512, max_prompt_length=512)[1]
    prompt_len = full["completion_mask"].index(1)
    cut = tokenize_for_distillation(CONVERSATION, template, tiny_tokenizer, max_length=12, max_prompt_length=8)[1]
    assert cut["input_ids"] == full["input_ids"][prompt_len - 8 : prompt_len + 4]
    assert cut["completion_mask"] == [0] * 8 + [1] * 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir):
    """A teacher that differs from the student: the tiny model SFT-trained on four answers (a LoRA adapter dir)."""
    return qa_adapter(tmp_path_factory, tiny_model_dir)


def held_out_rows(tokenizer):
    template = get_conv_template("qwen")
    records = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in alpaca_lines(50, 58)
    ]
    return [row for r in records for row in tokenize_for_distillation(r, template, tokenizer, 96, 48)]


def test_distillation_lowers_the_students_kl_to_the_teacher_on_held_out_prompts(
    tiny_model_dir, tiny_tokenizer, teacher, tmp_path, monkeypatch
):
    from trl.experimental.gkd import GKDTrainer

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model

    on_policy = []
    generate = GKDTrainer.generate_on_policy_outputs
    monkeypatch.setattr(GKDTrainer, "generate_on_policy_outputs",
                        staticmethod(lambda *a: on_policy.append(1) or generate(*a)))  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_lines(0, 16))
    out = tmp_path / "outputs-distill"
    distill_training.main([
        "--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", teacher, "--template_name", "qwen",
        "--train_file_dir", str(train), "--do_train", "--use_peft", "True", "--lora_rank", "16", "--lora_alpha", "32",
        "--lmbda", "0.5", "--beta", "0", "--max_new_tokens", "12", "--max_length", "96", "--max_prompt_length", "48",
        "--max_steps", "8", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lr_scheduler_type",
        "constant", "--seed", "1", "--save_strategy", "no", "--output_dir", str(out), *FAST_FLAGS,
    ])  # fmt: skip
    assert 0 < len(on_policy) < 8  # both kinds of batches trained: the student's own answers and the data's

    model_args = ModelArguments()
    teacher_model = load_model(model_args, teacher).eval()
    rows = held_out_rows(tiny_tokenizer)
    before, tokens = teacher_kl(load_model(model_args, tiny_model_dir).eval(), teacher_model, rows)
    after, same_tokens = teacher_kl(load_model(model_args, str(out)).eval(), teacher_model, rows)  # adapter + base
    assert tokens == same_tokens > 200
    assert after < 0.8 * before, (before, after)  # measured: 0.0232 -> 0.0163


def test_the_distilled_adapter_merges_and_answers_like_itself_in_inference(tiny_model_dir, teacher, tmp_path):
    import inference
    import merge_peft_adapter

    out = tmp_path / "outputs-distill"
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_lines(0, 4))
    distill_training.main([
        "--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", teacher, "--template_name", "qwen",
        "--train_file_dir", str(train), "--do_train", "--use_peft", "True", "--lmbda", "1", "--max_new_tokens", "4",
        "--max_length", "64", "--max_prompt_length", "32", "--max_steps", "1", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--output_dir", str(out), *FAST_FLAGS,
    ])  # fmt: skip
    merged = tmp_path / "merged-distill"
    merge_peft_adapter.main(["--peft_model_path", str(out), "--output_dir", str(merged), "--template_name", "qwen"])
    questions = tmp_path / "q.txt"
    questions.write_text("感冒了怎么办？\n高血压吃什么药？\n", encoding="utf-8")
    answers = {}
    for name, model_flags in (("adapter", ["--base_model", tiny_model_dir, "--lora_model", str(out)]),
                              ("merged", ["--base_model", str(merged)])):  # fmt: skip
        output = tmp_path / f"{name}.jsonl"
        inference.main([*model_flags, "--template_name", "qwen", "--data_file", str(questions), "--output_file",
                        str(output), "--temperature", "0", "--max_new_tokens", "8"])  # fmt: skip
        answers[name] = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in answers["adapter"]] == ["感冒了怎么办？", "高血压吃什么药？"]
    assert answers["adapter"] == answers["merged"]


def test_a_teacher_with_another_vocabulary_is_refused_by_flag_before_training(tiny_model_dir, tmp_path):
    from medicalgpt.quickstart.tiny_model import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), [str(REPO / "data" / "pretrain" / "medical_notes_en.txt")])
    argv = ["--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", other, "--do_train",
            "--train_file_dir", str(REPO / "data" / "finetune"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UsageError, match=f"--teacher_model_name_or_path {other}: its tokenizer differs"):
        distill_training.main([*argv, *FAST_FLAGS])
    assert not (tmp_path / "out").exists()


def test_command_line_mistakes_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_model_dir, "--do_train", "--train_file_dir", str(REPO / "data" / "finetune"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    missing = run([sys.executable, "distill_training.py", *argv])  # as a user runs it
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: --teacher_model_name_or_path is required: the model to distill from."
    )
    argv += ["--teacher_model_name_or_path", tiny_model_dir]
    with pytest.raises(UsageError, match=r"--max_prompt_length \(512\) must be below --max_length \(64\)"):
        distill_training.main([*argv, "--max_length", "64"])
    with pytest.raises(SystemExit) as exit_code:
        distill_training.main([*argv, "--teacher_load_in_4bit", "True", "--teacher_load_in_8bit", "True"])
    assert exit_code.value.code == 2 and "exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_4bit_teacher_loads_on_cpu_and_stays_close_to_its_full_precision_self(
    tiny_model_dir, tiny_tokenizer, teacher
):
    pytest.importorskip("bitsandbytes")
    from trl.experimental.gkd import GKDConfig

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model
    from medicalgpt.train.distill import DistillArguments, load_teacher

    config = GKDConfig(output_dir="unused", teacher_model_name_or_path=teacher, bf16=False)
    quantized = load_teacher(ModelArguments(torch_dtype="float32"), DistillArguments(teacher_load_in_4bit=True),
                             config, tiny_tokenizer)  # fmt: skip
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    assert not any(p.requires_grad for p in quantized.parameters())
    rows = held_out_rows(tiny_tokenizer)[:4]
    full = load_model(ModelArguments(), teacher).eval()
    rounding, _ = teacher_kl(full, quantized, rows)
    distance, _ = teacher_kl(load_model(ModelArguments(), tiny_model_dir).eval(), full, rows)
    assert 0 < rounding < 0.05 * distance  # NF4 rounding moves it far less than the student is from it


def test_run_distill_sh_starts_a_command_line_the_script_accepts(tmp_path):
    import shutil
    import subprocess

    from trl.experimental.gkd import GKDConfig

    from medicalgpt.args import DataArguments, LoraArguments, ModelArguments
    from medicalgpt.parser import parse_args
    from medicalgpt.train.distill import DistillArguments
    from tests.helpers import ENV

    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    shutil.copy(REPO / "run_distill.sh", tmp_path)
    env = {**ENV, "PYTHON": "true", "TEACHER": "teacher-7b", "EXTRA_ARGS": "--max_steps 3"}
    result = subprocess.run(["sh", "run_distill.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stderr.splitlines() if line.startswith("+ "))[2:].split()
    assert command[:2] == ["true", "distill_training.py"]
    config, model_args, _, lora_args, distill_args = parse_args(
        GKDConfig, ModelArguments, DataArguments, LoraArguments, DistillArguments, argv=command[2:]
    )
    assert (config.teacher_model_name_or_path, distill_args.teacher_load_in_4bit) == ("teacher-7b", True)
    assert (config.lmbda, config.beta, config.max_new_tokens, config.max_steps) == (0.5, 0.5, 128, 3)
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and lora_args.use_peft


def test_upstream_opd_flags_set_lmbda_and_beta():
    from trl.experimental.gkd import GKDConfig

    from medicalgpt.args import DataArguments, LoraArguments, ModelArguments
    from medicalgpt.parser import parse_args
    from medicalgpt.train.distill import DistillArguments, reconcile_distill_args

    argv = ["--teacher_model_name_or_path", "t", "--opd_lambda", "0.8", "--opd_beta", "0.1", "--output_dir", "o"]
    config, *_, distill_args = parse_args(
        GKDConfig, ModelArguments, DataArguments, LoraArguments, DistillArguments, argv=argv
    )
    reconcile_distill_args(config, distill_args)
    assert (config.lmbda, config.beta) == (0.8, 0.1)


def test_a_teacher_with_padded_vocabulary_rows_is_cut_to_the_students_exactly(tiny_model_dir, tiny_tokenizer):
    """Qwen2.5-7B has 152,064 output rows, 0.5B 151,936: the unused rows go, every real token's logit stays."""
    from transformers import AutoModelForCausalLM

    from medicalgpt.train.distill import fit_teacher_vocabulary

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    size = student.get_output_embeddings().weight.shape[0]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher.resize_token_embeddings(size + 64)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        padded = teacher(ids).logits
    fit_teacher_vocabulary(teacher, student, tiny_tokenizer)
    with torch.no_grad():
        cut = teacher(ids).logits
    assert padded.shape[-1] == size + 64 and cut.shape[-1] == size
    torch.testing.assert_close(cut, padded[..., :size], rtol=0, atol=0)
    teacher.resize_token_embeddings(size + 8)
    with pytest.raises(UsageError, match="needs the teacher to cover the student's"):
        fit_teacher_vocabulary(student, teacher, tiny_tokenizer)  # the teacher is the smaller one here


def test_help_shows_the_commands_and_the_distillation_options(capsys):
    with pytest.raises(SystemExit) as exit_code:
        distill_training.main(["--help"])
    text = capsys.readouterr().out
    assert exit_code.value.code == 0
    assert "    python distill_training.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\" in text.splitlines()
    for flag in ("--teacher_model_name_or_path", "--teacher_load_in_4bit", "--lmbda", "--beta", "--max_new_tokens"):
        assert flag in text
