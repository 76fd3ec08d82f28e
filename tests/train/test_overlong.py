"""Conversations longer than --model_max_length: truncate (the default) or drop, with exact ids and labels."""

import json
import logging

import datasets
import pytest

import supervised_finetuning
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.sft import PROMPT_SHARE, prepare_sft_dataset, tokenize_conversation
from medicalgpt.templates import get_conv_template
from tests.helpers import FAST_FLAGS, write_jsonl

TEMPLATE = get_conv_template("qwen")
LONG_ANSWER = "多喝水，注意休息。" * 12
LONG_QUESTION = "孩子发烧三天了，体温一直在三十九度左右，" * 8


def exchange(question, answer, *more):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for later_question, later_answer in zip(more[::2], more[1::2]):
        messages += [{"role": "user", "content": later_question}, {"role": "assistant", "content": later_answer}]
    return {"messages": messages, "system": "", "tools": None}


def full_and_prompt_length(record, tokenizer):
    """The untruncated tokenisation and the length of its first prompt (the -100 head before the first answer)."""
    full = tokenize_conversation(record, TEMPLATE, tokenizer)
    prompt_length = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    return full, prompt_length


@pytest.fixture(scope="module")
def im_end(tiny_tokenizer):
    return tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_long_answer_is_cut_at_the_budget_and_learns_no_end_of_turn(tiny_tokenizer, im_end):
    record = exchange("小孩发烧怎么办？", LONG_ANSWER)
    full, prompt_length = full_and_prompt_length(record, tiny_tokenizer)
    budget = prompt_length + 20
    assert len(full["input_ids"]) > budget + 10 and full["labels"][-1] == im_end

    cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=budget)
    assert cut["input_ids"] == full["input_ids"][:budget]
    assert cut["labels"] == [IGNORE_INDEX] * prompt_length + full["input_ids"][prompt_length:budget]
    assert im_end not in cut["labels"]
    assert (cut["truncated"], cut["dropped_turns"]) == (True, 0)


def test_long_prompt_keeps_its_head_up_to_the_share_and_the_answer_gets_the_rest(tiny_tokenizer):
    record = exchange(LONG_QUESTION, LONG_ANSWER)
    full, prompt_length = full_and_prompt_length(record, tiny_tokenizer)
    budget = 40
    head = int(budget * PROMPT_SHARE)
    assert prompt_length > head and len(full["input_ids"]) - prompt_length > budget - head

    cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=budget)
    answer_start = full["input_ids"][prompt_length : prompt_length + budget - head]
    assert cut["input_ids"] == full["input_ids"][:head] + answer_start
    assert cut["labels"] == [IGNORE_INDEX] * head + answer_start


def test_long_prompt_with_a_short_answer_keeps_the_whole_answer_and_its_end_of_turn(tiny_tokenizer, im_end):
    record = exchange(LONG_QUESTION, "请就医。")
    full, prompt_length = full_and_prompt_length(record, tiny_tokenizer)
    answer = full["input_ids"][prompt_length:]
    budget = 30
    assert prompt_length > budget and len(answer) < budget * PROMPT_SHARE

    cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=budget)
    assert cut["input_ids"] == full["input_ids"][: budget - len(answer)] + answer
    assert cut["labels"] == [IGNORE_INDEX] * (budget - len(answer)) + answer
    assert cut["labels"][-1] == im_end and cut["truncated"] is True


def test_train_on_inputs_learns_the_cut_prompt_too(tiny_tokenizer):
    record = exchange(LONG_QUESTION, LONG_ANSWER)
    cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=40, train_on_inputs=True)
    assert len(cut["input_ids"]) == 40 and cut["labels"] == cut["input_ids"]


def test_later_turns_that_do_not_fit_are_dropped_whole_under_both_policies(tiny_tokenizer):
    record = exchange("发烧怎么办？", "多喝水。", "还要注意什么？", LONG_ANSWER)
    first_only = tokenize_conversation(exchange("发烧怎么办？", "多喝水。"), TEMPLATE, tiny_tokenizer)
    budget = len(first_only["input_ids"]) + 30
    for policy in ("truncate", "drop"):
        cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=budget, overlong=policy)
        assert (cut["input_ids"], cut["labels"]) == (first_only["input_ids"], first_only["labels"])
        assert (cut["truncated"], cut["dropped_turns"]) == (False, 1)


def test_drop_skips_a_conversation_whose_first_exchange_does_not_fit(tiny_tokenizer):
    record = exchange("小孩发烧怎么办？", LONG_ANSWER, "还要注意什么？", "多休息。")
    cut = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=30, overlong="drop")
    assert (cut["input_ids"], cut["labels"], cut["dropped_turns"], cut["truncated"]) == ([], [], 2, False)


def test_a_conversation_that_fits_is_untouched(tiny_tokenizer, im_end):
    record = exchange("小孩发烧怎么办？", LONG_ANSWER)
    full = tokenize_conversation(record, TEMPLATE, tiny_tokenizer)
    exact = tokenize_conversation(record, TEMPLATE, tiny_tokenizer, max_length=len(full["input_ids"]))
    assert exact == {**full, "truncated": False}


def _records():
    return [
        exchange("发烧怎么办？", "多喝水。"),  # fits
        exchange("小孩发烧怎么办？", LONG_ANSWER),  # first exchange too long
        exchange("发烧怎么办？", "多喝水。", "还要注意什么？", LONG_ANSWER),  # its second turn does not fit
    ]


@pytest.mark.parametrize("policy, rows", [("truncate", 3), ("drop", 2)])
def test_prepare_sft_dataset_counts_truncated_shortened_and_skipped(tiny_tokenizer, caplog, policy, rows):
    caplog.set_level(logging.WARNING, logger="medicalgpt")
    dataset = prepare_sft_dataset(datasets.Dataset.from_list(_records()), TEMPLATE, tiny_tokenizer, 48,
                                  overlong=policy)  # fmt: skip
    assert len(dataset) == rows and dataset.column_names == ["input_ids", "labels"]
    assert max(len(ids) for ids in dataset["input_ids"]) <= 48
    log = caplog.text
    assert "1 conversations were longer than model_max_length=48: their last 1 turns in all were dropped" in log
    assert ("1 conversations were truncated" in log) == (policy == "truncate")
    assert ("1 conversations were skipped" in log) == (policy == "drop")


def test_unknown_policy_is_a_clean_error(tiny_tokenizer, tmp_path, capsys):
    with pytest.raises(ValueError, match="--overlong must be one of truncate, drop"):
        prepare_sft_dataset(datasets.Dataset.from_list(_records()), TEMPLATE, tiny_tokenizer, 48, overlong="cut")
    with pytest.raises(SystemExit) as exit_info:
        supervised_finetuning.main(["--output_dir", str(tmp_path), "--overlong", "cut"])
    assert exit_info.value.code == 2
    assert "--overlong must be truncate or drop, got 'cut'" in capsys.readouterr().err


@pytest.mark.parametrize("policy, learned_rows", [(None, 2), ("drop", 1)])
def test_sft_keeps_long_answers_by_default_and_drops_them_when_asked(
    tiny_model_dir, tmp_path, caplog, policy, learned_rows
):
    data = write_jsonl(tmp_path / "long.jsonl", [
        {"instruction": "发烧怎么办？", "output": "多喝水。", "system": "医生"},
        {"instruction": "小孩发烧怎么办？", "output": LONG_ANSWER, "system": "医生"},
    ])  # fmt: skip
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--template_name", "qwen"]
    argv += ["--do_train", "--model_max_length", "48", "--packing", "False", "--per_device_train_batch_size", "1"]
    argv += ["--num_train_epochs", "1", "--save_strategy", "no", "--output_dir", str(out), *FAST_FLAGS]
    argv += [] if policy is None else ["--overlong", policy]
    caplog.set_level(logging.WARNING, logger="medicalgpt")
    supervised_finetuning.main(argv)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == learned_rows
    assert ("1 conversations were truncated" in caplog.text) == (policy is None)
