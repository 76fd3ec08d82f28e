"""Verifiable rewards: the exact reward of given completions to exam items, and exam files as GRPO data."""

import pytest

from medicalgpt.errors import DataValidationError
from medicalgpt.rl.exam import load_exam_records, reward_columns
from medicalgpt.rl.verifiable import VERIFIABLE_REWARDS, choice_accuracy, format_reward
from tests.helpers import write_jsonl

SINGLE = [
    ("答案：B", 1.0),
    ("答案是B。", 1.0),
    ("正确答案为（B）", 1.0),
    ("B", 1.0),
    ("B.", 1.0),
    ("B. ≥7.0 mmol/L", 1.0),
    ("(B)", 1.0),
    ("【B】", 1.0),
    ("**B**", 1.0),
    ("The answer is B", 1.0),
    ("The answer is (B).", 1.0),
    ("Answer: B", 1.0),
    ("所以选B", 1.0),
    ("A项不对，B项也不对……所以答案是C", 0.0),  # the last cue decides: C
    ("答案：C", 0.0),
    ("AB", 0.0),  # one letter too many for a single-answer item
    ("Blood glucose above 7.0 mmol/L", 0.0),  # a word starting with B commits to nothing
    ("空腹血糖≥7.0 mmol/L 可诊断糖尿病。", 0.0),  # no letter
    ("", 0.0),
    ("答案：F", 0.0),  # not an option
    ("<think>\n空腹血糖的切点是7.0，对应选项B。\n</think>\n\n答案：B", 1.0),
    ("<think>\n应该是B吧……\n</think>\n\nA", 0.0),  # the answer after the think block counts, not the reasoning
    ("<think>\n对应选项B，答案：B", 0.0),  # the think block never closed: no answer
    ("<think>\n想一想\n</think>\n\n<answer>B</answer>", 1.0),
]

MULTI = [
    ("AB", 1.0),
    ("A、B", 1.0),
    ("答案：A,B", 1.0),
    ("正确答案是 A 和 B", 1.0),
    ("The answers are A and B", 1.0),
    ("BA", 1.0),  # a set: order does not matter
    ("A", 0.0),  # one of two: an exact set match is required
    ("ABC", 0.0),
    ("<think>\n糖尿病肾病和视网膜病变是微血管并发症。\n</think>\n\nAB", 1.0),
]


@pytest.mark.parametrize(("completion", "reward"), SINGLE, ids=[c for c, _ in SINGLE])
def test_choice_accuracy_of_a_single_answer_item(completion, reward):
    assert choice_accuracy([completion], answer=["B"], options=["ABCDE"]) == [reward]


@pytest.mark.parametrize(("completion", "reward"), MULTI, ids=[c for c, _ in MULTI])
def test_choice_accuracy_of_a_multi_select_item_needs_the_exact_set(completion, reward):
    assert choice_accuracy([completion], answer=["AB"], options=["ABCD"]) == [reward]


def test_choice_accuracy_scores_a_batch_item_by_item_and_reads_conversational_completions():
    completions = ["答案：B", [{"role": "assistant", "content": "AC"}], "C", "答案：D"]
    scores = choice_accuracy(completions, answer=["B", "AC", "A", "D"], options=["ABCD"] * 4, trainer_state=None)
    assert scores == [1.0, 1.0, 0.0, 1.0]


def test_choice_accuracy_ignores_letters_that_are_not_options_and_needs_a_committed_answer():
    replies = ["答案：E", "没有字母", "答案：A、E"]
    assert choice_accuracy(replies, answer=["A"] * 3, options=["ABCD"] * 3) == [0.0, 0.0, 1.0]
    assert choice_accuracy(["答案：E"], answer=["E"], options=None) == [1.0]  # no option column: any letter


FORMATS = [
    ("<think>\n空腹血糖≥7.0即可诊断。\n</think>\n\n答案：B", 1.0),
    ("<think>\nreasoning\n</think>\n\nB", 1.0),
    ("<think>\n\n</think>\n\nB", 0.0),  # empty reasoning: Qwen3's no-thinking block
    ("<think>\n推理\n</think>\n\n", 0.0),  # no answer after it
    ("<think>\n推理但没有结束", 0.0),
    ("答案：B", 0.0),  # no think block
    ("<think>\na\n</think>\n\nB<think>\nagain\n</think>", 0.0),  # a second block
    ("前言<think>\na\n</think>\n\nB", 0.0),  # text before the block
]


@pytest.mark.parametrize(("completion", "reward"), FORMATS, ids=[c for c, _ in FORMATS])
def test_format_reward_checks_qwen3_think_then_answer(completion, reward):
    assert format_reward([completion]) == [reward]


def test_rewards_are_named_as_the_flag_names_them():
    """trl logs rewards/<__name__>/mean: the names of --reward_funcs."""
    assert {name: func.__name__ for name, func in VERIFIABLE_REWARDS.items()} == {
        "choice_accuracy": "choice_accuracy",
        "format": "format",
    }


def test_exam_files_become_records_with_answer_and_option_columns(tmp_path):
    path = write_jsonl(tmp_path / "exam" / "items.jsonl", [
        {"question": "缺铁性贫血的血象是", "options": {"A": "大细胞性", "B": "小细胞低色素性"}, "answer": "B"},
        {"question": "Which are microvascular?", "options": ["nephropathy", "retinopathy", "stroke"], "answer": "A,B"},
    ])  # fmt: skip
    records = load_exam_records(str(tmp_path / "exam"))
    assert reward_columns(records) == {"answer": ["B", "AB"], "options": ["AB", "ABC"]}
    assert records[0]["messages"][0] == {
        "role": "user",
        "content": "以下是一道单项选择题，请直接给出正确答案的选项字母。\n\n"
        "缺铁性贫血的血象是\nA. 大细胞性\nB. 小细胞低色素性",
    }
    assert records[1]["source"] == f"{path}:2"


def test_a_bad_exam_item_is_reported_by_path_and_line(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", [
        {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "B"},
        {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "E"},
    ])  # fmt: skip
    with pytest.raises(DataValidationError, match=rf"{path}:2: error: answer: E is not one of the options"):
        load_exam_records(str(path))
