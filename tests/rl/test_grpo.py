"""GRPO with verifiable rewards through ppo_training.py: a toy exam learned from choice_accuracy alone, the weighted
sum of several rewards, and the one-line errors of a run that cannot work."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppo_training
import supervised_finetuning
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.rl.exam import exam_accuracy, load_exam_records
from medicalgpt.rl.prompts import prepare_rl_prompts
from medicalgpt.rl.rollout import stop_token_ids
from medicalgpt.templates import build_template
from tests.helpers import FAST_FLAGS, REPO, write_jsonl

SYMPTOMS = ["头痛", "咳嗽", "发烧", "胃痛", "腰痛", "失眠", "牙痛", "鼻塞", "腹泻", "皮疹", "耳鸣", "乏力"]
# A toy exam whose rule is learnable by a tiny model: whatever the question, option C is right. The policy starts
# from answering every question with each letter equally often; GRPO on choice_accuracy alone must find the rule.
EXAM = [
    {"id": f"toy-{i}", "question": f"{symptom}时，下列哪一项是本题的正确选项？",
     "options": {"A": "选项甲", "B": "选项乙", "C": "选项丙", "D": "选项丁"}, "answer": "C"}
    for i, symptom in enumerate(SYMPTOMS)
]  # fmt: skip
TRAIN, HELD_OUT = EXAM[:8], EXAM[8:]


@pytest.fixture(scope="module")
def exam_setup(tiny_model_dir, tmp_path_factory):
    """A tiny policy fine-tuned to answer each training question with a letter, each of the four equally often."""
    root = tmp_path_factory.mktemp("grpo")
    exam = write_jsonl(root / "exam" / "train.jsonl", TRAIN)
    records = load_exam_records(str(exam))
    held_out = load_exam_records(str(write_jsonl(root / "held-out.jsonl", HELD_OUT)))
    sft_data = write_jsonl(root / "sft" / "letters.jsonl", [
        {"messages": [record["messages"][0], {"role": "assistant", "content": letter}]}
        for record in records for letter in "ABCD"
    ])  # fmt: skip
    sft = root / "sft-model"
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(sft_data),
                                "--template_name", "qwen", "--do_train", "--num_train_epochs", "20",
                                "--learning_rate", "1e-2", "--per_device_train_batch_size", "32",
                                "--output_dir", str(sft), "--save_strategy", "no", *FAST_FLAGS])  # fmt: skip
    return {"sft": str(sft), "exam": str(exam), "held_out": held_out}


def grpo_argv(setup, output_dir, *extra):
    return ["--rl_algorithm", "grpo", "--reward_funcs", "choice_accuracy", "--sft_model_path", setup["sft"],
            "--template_name", "qwen", "--train_file_dir", setup["exam"], "--do_train", "--output_dir",
            str(output_dir), "--response_length", "4", "--num_generations", "8", "--per_device_train_batch_size",
            "16", "--learning_rate", "5e-3", "--logging_steps", "1", "--save_strategy", "no", "--seed", "1",
            *FAST_FLAGS, *extra]  # fmt: skip


def greedy_accuracy(model_dir, records):
    """The share of the exam a model answers right, decoding greedily from the prompts GRPO trained on."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = build_template("qwen", tokenizer)
    prompts = prepare_rl_prompts(records, template, tokenizer, 1024)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return exam_accuracy(model, tokenizer, prompts, records, stop_token_ids(tokenizer, template), max_new_tokens=4)


def test_grpo_on_choice_accuracy_raises_the_share_of_right_answers(exam_setup, tmp_path):
    """Also --do_eval: after training, the held-out items' sampled reward is evaluated and saved (eval_results.json),
    and it is the trained policy's: higher than the same evaluation of the SFT policy (--do_eval alone)."""
    out, held_out = tmp_path / "grpo", write_jsonl(tmp_path / "held-out" / "exam.jsonl", HELD_OUT)
    evaluation = ["--do_eval", "--validation_file_dir", str(held_out.parent)]
    ppo_training.main(grpo_argv(exam_setup, out, "--max_steps", "10", *evaluation))
    before = greedy_accuracy(exam_setup["sft"], exam_setup["held_out"])
    after = greedy_accuracy(str(out), exam_setup["held_out"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rewards = [entry["rewards/choice_accuracy/mean"] for entry in history if "rewards/choice_accuracy/mean" in entry]
    print(f"held-out greedy accuracy {before} -> {after}; sampled reward per step {rewards}")
    assert before <= 0.5, "the SFT policy answers each question with any letter"
    assert after == 1.0, "GRPO on choice_accuracy alone finds the rule, also on questions it never trained on"
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, "the sampled reward rises too"

    sft_only = tmp_path / "sft-eval"
    argv = grpo_argv(exam_setup, sft_only, *evaluation)
    argv.remove("--do_train")
    ppo_training.main(argv)
    trained = json.loads((out / "eval_results.json").read_text())["eval_rewards/choice_accuracy/mean"]
    untrained = json.loads((sft_only / "eval_results.json").read_text())["eval_rewards/choice_accuracy/mean"]
    print(f"held-out sampled reward (--do_eval): SFT {untrained}, GRPO {trained}")
    assert trained > untrained + 0.3
    assert not (sft_only / "train_results.json").exists(), "--do_eval alone trains nothing"


def test_rewards_are_summed_with_their_weights(exam_setup, rm_adapter_dir, tmp_path):
    """--reward_funcs choice_accuracy,format,reward_model --reward_weights 1 0.2 1: trl logs each reward's mean and
    the reward it trains on, their weighted sum."""
    out = tmp_path / "weighted"
    ppo_training.main(grpo_argv(exam_setup, out, "--max_steps", "2", "--reward_funcs",
                                "choice_accuracy,format,reward_model", "--reward_model_path", rm_adapter_dir,
                                "--reward_weights", "1", "0.2", "1", "--template_name", "qwen3"))  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "rewards/choice_accuracy/mean" in entry]
    assert len(steps) == 2
    for entry in steps:
        means = [entry[f"rewards/{name}/mean"] for name in ("choice_accuracy", "format", "reward_model")]
        assert entry["reward"] == pytest.approx(means[0] + 0.2 * means[1] + means[2], abs=1e-4)
        assert means[1] == 0.0, "a tiny model that never learned <think> gets no format reward"


def test_bad_exam_items_fail_by_path_and_line_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    exam = write_jsonl(tmp_path / "exam.jsonl", [
        {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "B"},
        {"question": "q", "options": {"A": "a", "B": "b"}},
    ])  # fmt: skip
    argv = ["--rl_algorithm", "grpo", "--reward_funcs", "choice_accuracy", "--sft_model_path", tiny_model_dir,
            "--train_file_dir", str(exam), "--do_train", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    # The model path is checked first (it exists); the data are checked before any model loads.
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(DataValidationError, match=rf"{exam}:2: error: answer: expected the letter"):
        ppo_training.main(argv)


@pytest.mark.parametrize(("extra", "message"), [
    (["--reward_weights", "1", "0.5"], "--reward_weights gives 2 weights for 1 --reward_funcs"),
    (["--reward_funcs", "choice_accuracy,format"], "--reward_funcs format checks Qwen3's <think> block"),
    (["--reward_funcs", "choice_accuracy,reward_model"], "--reward_funcs reward_model .* needs --reward_model_path"),
])  # fmt: skip
def test_a_run_that_cannot_work_is_a_one_line_usage_error(extra, message, tiny_model_dir, tmp_path):
    argv = ["--rl_algorithm", "grpo", "--reward_funcs", "choice_accuracy", "--sft_model_path", tiny_model_dir,
            "--template_name", "qwen", "--train_file_dir", str(REPO / "data" / "grpo"), "--do_train",
            "--output_dir", str(tmp_path / "out"), *FAST_FLAGS, *extra]  # fmt: skip
    with pytest.raises(UsageError, match=message):
        ppo_training.main(argv)


def test_verifiable_rewards_need_a_critic_free_algorithm(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo_training.main(["--sft_model_path", "x", "--reward_funcs", "choice_accuracy", "--output_dir", "unused"])
    assert exit_info.value.code != 0
    assert "--reward_funcs other than reward_model need --rl_algorithm grpo or rloo" in capsys.readouterr().err


def test_dr_grpo_with_sequence_level_importance_sampling_learns_the_exam_too(exam_setup, tmp_path):
    """Dr. GRPO (no length normalisation, no std scaling) with GSPO's one importance ratio per answer."""
    out = tmp_path / "dr-grpo-gspo"
    ppo_training.main(grpo_argv(exam_setup, out, "--max_steps", "10", "--loss_type", "dr_grpo", "--scale_rewards",
                                "none", "--importance_sampling_level", "sequence"))  # fmt: skip
    before = greedy_accuracy(exam_setup["sft"], exam_setup["held_out"])
    after = greedy_accuracy(str(out), exam_setup["held_out"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rewards = [entry["rewards/choice_accuracy/mean"] for entry in history if "rewards/choice_accuracy/mean" in entry]
    print(f"dr_grpo + sequence: held-out greedy accuracy {before} -> {after}; sampled reward per step {rewards}")
    trained_with = torch.load(out / "training_args.bin", weights_only=False)
    assert (trained_with.loss_type, trained_with.scale_rewards, trained_with.importance_sampling_level) == (
        "dr_grpo", "none", "sequence")  # fmt: skip
    assert before <= 0.5
    assert after == 1.0
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
