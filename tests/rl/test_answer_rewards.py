"""The answer reader where replies are scored: GRPO's choice_accuracy through ppo_training.py gives an explained right
answer the full reward and a wrong one 0, evaluate.py --choice_mode generate reads a Qwen3 thinking reply after
</think>, and every reply of the labelled corpus scores the same in GRPO and in evaluate.py."""

import json
import re

import pytest
from fastapi import FastAPI

import evaluate
import ppo_training
import supervised_finetuning
from medicalgpt.eval.choice import run_choice_generate
from medicalgpt.rl.exam import load_exam_records
from medicalgpt.rl.verifiable import choice_accuracy
from tests.helpers import FAST_FLAGS, REPO, answer_corpus, serving, write_jsonl

CORPUS = answer_corpus()

# replies that explain themselves and mention another option on the way ("Option A is wrong", "选择A的同学")
EXPLAINED = [
    row
    for row in CORPUS
    if row["source"] == "hand"
    and row["rule"] in ("cue", "negated")
    and row["expected"]
    and len(row["expected"]) == 1
    and row["options"] == "ABCD"
    and len(row["reply"]) < 40
    and set(re.findall(r"(?<![A-Za-z])[A-D](?![A-Za-z])", row["reply"])) - set(row["expected"])
][:6]


def mentioned_other(row):
    return sorted(set(re.findall(r"(?<![A-Za-z])[A-D](?![A-Za-z])", row["reply"])) - set(row["expected"]))[0]


GRPO_ITEMS = [json.loads(line) for line in (REPO / "data" / "grpo" / "train.jsonl").open(encoding="utf-8")]


def exam(answers):
    """The first sample GRPO items (distinct questions, four options each) keyed to `answers`."""
    return [{**item, "answer": answer} for item, answer in zip(GRPO_ITEMS, answers)]


@pytest.fixture(scope="module")
def explaining_policy(tiny_model_dir, tmp_path_factory):
    """A tiny policy fine-tuned to answer question i with EXPLAINED[i]'s reply, word for word; the exam files give
    each question the answer that reply commits to (right.jsonl) or the other letter it mentions (wrong.jsonl)."""
    root = tmp_path_factory.mktemp("explaining")
    right = write_jsonl(root / "right.jsonl", exam([row["expected"] for row in EXPLAINED]))
    wrong = write_jsonl(root / "wrong.jsonl", exam([mentioned_other(row) for row in EXPLAINED]))
    records = load_exam_records(str(right))
    sft_data = write_jsonl(
        root / "sft.jsonl",
        [
            {"messages": [record["messages"][0], {"role": "assistant", "content": row["reply"]}]}
            for record, row in zip(records, EXPLAINED)
        ],
    )
    supervised_finetuning.main(
        [
            "--model_name_or_path",
            tiny_model_dir,
            "--train_file_dir",
            str(sft_data),
            "--template_name",
            "qwen",
            "--do_train",
            "--num_train_epochs",
            "100",
            "--learning_rate",
            "1e-2",
            "--per_device_train_batch_size",
            "6",
            "--output_dir",
            str(root / "sft"),
            "--save_strategy",
            "no",
            *FAST_FLAGS,
        ]
    )
    return {"model": str(root / "sft"), "right": str(right), "wrong": str(wrong)}


def test_the_corpus_has_explained_replies_that_mention_another_letter():
    assert len(EXPLAINED) == 6 and {row["language"] for row in EXPLAINED} == {"en", "zh"}


def test_grpo_gives_an_explained_right_answer_the_full_reward_and_a_wrong_one_zero(explaining_policy, tmp_path):
    """Trained on the right keys, evaluated on the wrong ones: the same memorised replies score 1.0 and 0.0."""
    out = tmp_path / "grpo"
    n = len(EXPLAINED)
    ppo_training.main(
        [
            "--rl_algorithm",
            "grpo",
            "--reward_funcs",
            "choice_accuracy",
            "--sft_model_path",
            explaining_policy["model"],
            "--template_name",
            "qwen",
            "--train_file_dir",
            explaining_policy["right"],
            "--validation_file_dir",
            explaining_policy["wrong"],
            "--do_train",
            "--do_eval",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--output_dir",
            str(out),
            "--response_length",
            "48",
            "--num_generations",
            "2",
            "--temperature",
            "0.05",
            "--per_device_train_batch_size",
            str(2 * n),
            "--per_device_eval_batch_size",
            str(2 * n),
            "--max_steps",
            "1",
            "--learning_rate",
            "1e-9",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            *FAST_FLAGS,
        ]
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train = [entry["rewards/choice_accuracy/mean"] for entry in history if "rewards/choice_accuracy/mean" in entry]
    held = [
        entry["eval_rewards/choice_accuracy/mean"] for entry in history if "eval_rewards/choice_accuracy/mean" in entry
    ]
    assert train == [1.0] and held == [0.0]


class ScriptedAPI:
    """An OpenAI-compatible /v1/chat/completions that answers each question with a scripted reply."""

    def __init__(self, replies):
        self.replies, self.app = replies, FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)

    def complete(self, body: dict):
        question = next(key for key in self.replies if key in body["messages"][-1]["content"])
        return {"choices": [{"message": {"role": "assistant", "content": self.replies[question]}}]}


def test_evaluate_reads_a_qwen3_thinking_reply_after_its_think_block(tmp_path):
    items = exam(["B", "B", "C"])
    replies = {
        "空腹血糖": "<think>\n答案是C吗？不对，C是干扰项。\n</think>\n\n答案是B",  # reasoning names C, answer B
        "胸外按压": "<think>\nThe answer is A? No: A is wrong.\n</think>\n\nThe answer is **B**.",
        "凝血因子": "<think>\n答案应该是C，不过还要再核对一下",
    }  # never closed: no answer
    data = write_jsonl(tmp_path / "exam.jsonl", items)
    with serving(ScriptedAPI(replies).app) as url:
        metrics = evaluate.main(
            [
                "--task",
                "choice",
                "--choice_mode",
                "generate",
                "--api_base",
                f"{url}/v1",
                "--model",
                "scripted",
                "--data_file",
                str(data),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    rows = [json.loads(line) for line in (tmp_path / "out" / "choice_predictions.jsonl").open()]
    assert [row["prediction"] for row in rows] == ["B", "B", None]
    assert metrics["correct"] == 2 and metrics["unparsed"] == 1
    scores = choice_accuracy([row["reply"] for row in rows], answer=["B", "B", "C"], options=["ABCD"] * 3)
    assert scores == [1.0, 1.0, 0.0] == [float(row["correct"]) for row in rows]


def test_every_corpus_reply_scores_the_same_in_grpo_and_in_evaluate():
    """Each labelled reply, keyed to its labelled answer (or a letter when it commits to none), is right for both
    or for neither."""
    items = [
        {
            "options": {letter: f"option {letter}" for letter in row["options"]},
            "answer": row["expected"] or "A",
            "record": {},
            "source": row["id"],
            "subject": "",
            "question": "q",
        }
        for row in CORPUS
    ]
    replies = iter(row["reply"] for row in CORPUS)  # run_choice_generate asks in item order
    _, rows = run_choice_generate(lambda batch: [next(replies) for _ in batch], items)
    rewards = choice_accuracy(
        [row["reply"] for row in CORPUS],
        answer=[item["answer"] for item in items],
        options=[row["options"] for row in CORPUS],
    )
    assert [float(row["correct"]) for row in rows] == rewards
    assert sum(rewards) == sum(row["expected"] is not None for row in CORPUS)
