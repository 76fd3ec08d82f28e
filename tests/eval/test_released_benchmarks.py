"""Released MedQA and PubMedQA test items, real size, scored to the end by a model whose context (2,048 tokens, with a
byte-level tokenizer) some of them exceed: those keep their end, as lm-evaluation-harness does, counted per subject
beside the chance and majority-answer baselines. The sample (tests/assets/released) runs in `make test`; the whole
test sets (1,273 and 500 items, `make released-benchmarks`) in the real-model tier."""

import collections
import json
import os
from pathlib import Path

import pytest

import evaluate
from medicalgpt.errors import DataValidationError
from tests.helpers import CORPUS, REPO, write_jsonl

SAMPLE = REPO / "tests" / "assets" / "released"
# make released-benchmarks (RELEASED_BENCHMARKS=folder elsewhere)
RELEASED = Path(os.environ.get("RELEASED_BENCHMARKS", REPO / "models" / "released-benchmarks"))
CONTEXT = 2048


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """The tests' tiny model with a byte-level tokenizer (300 tokens) and a context of 2,048 positions."""
    from medicalgpt.quickstart.tiny_model import build_tiny_model

    folder = build_tiny_model(str(tmp_path_factory.mktemp("byte-2048")), CORPUS, vocab_size=300)
    config_file = f"{folder}/config.json"
    config = json.loads(open(config_file).read())
    config["max_position_embeddings"] = CONTEXT
    open(config_file, "w").write(json.dumps(config))
    return folder


def score(model, data, out, *flags):
    argv = ["--task", "choice", "--base_model", model, "--template_name", "qwen", "--data_file", str(data)]
    return evaluate.main([*argv, "--output_dir", str(out), "--batch_size", "4", *flags])


def predictions(out):
    return [json.loads(line) for line in (out / "choice_predictions.jsonl").read_text().splitlines()]


def prompt_tokens(model, data):
    """Each item's whole chat prompt, in tokens, as evaluate.py renders it (no shots) before any truncation."""
    from medicalgpt.eval.benchmarks import load_benchmark
    from medicalgpt.eval.choice import encode_choice
    from medicalgpt.serve.chat import ChatArguments, load_chat_engine

    engine = load_chat_engine(ChatArguments(base_model=model, template_name="qwen"))
    items, _ = load_benchmark(str(data))
    return [len(encode_choice(item, [], engine.tokenizer, engine.encode)[0]) for item in items]


def test_items_longer_than_the_context_keep_their_end_and_are_counted(byte_model, tmp_path):
    out = tmp_path / "medqa"
    results = score(byte_model, SAMPLE / "medqa" / "test.jsonl", out)
    lengths = prompt_tokens(byte_model, SAMPLE / "medqa" / "test.jsonl")
    cut = [max(0, length + 1 - CONTEXT) for length in lengths]  # the answer letter is one token
    rows = predictions(out)
    assert [row["truncated_tokens"] for row in rows] == cut and sum(c > 0 for c in cut) == 2
    assert results["items"] == 5 and results["truncated"] == 2
    assert {name: s["truncated"] for name, s in results["subjects"].items()} == {"step1": 0, "step2&3": 2}
    assert results["chance"] == pytest.approx(0.2)
    assert (results["majority"], results["majority_answer"]) == (0.6, "C")  # C, E, C, D, C
    assert all(set(row["scores"]) == set("ABCDE") for row in rows)  # scored to the end, every option


def test_pubmedqa_items_are_located_by_id_and_a_majority_answer_is_beside_chance(byte_model, tmp_path):
    results = score(byte_model, SAMPLE / "pubmedqa" / "ori_pqal.json", tmp_path / "pubmedqa")
    rows = predictions(tmp_path / "pubmedqa")
    assert [row["source"].rsplit(":", 1)[1] for row in rows] == [
        "pqal-test-001", "pqal-test-002", "pqal-test-003", "pqal-test-312", "pqal-test-498"
    ]  # fmt: skip
    assert results["truncated"] == 2 and [row["truncated_tokens"] > 0 for row in rows] == [0, 0, 0, 1, 1]
    assert results["chance"] == pytest.approx(1 / 3)
    assert (results["majority"], results["majority_answer"]) == (0.6, "B")  # 3 "no" of 5


def test_the_kept_end_is_exactly_the_last_tokens(tiny_tokenizer):
    from medicalgpt.eval.choice import build_choice_prompts, encode_choice

    item = {"question": "发烧 " * 40, "options": {"A": "是", "B": "否"}, "answer": "A", "subject": None,
            "source": "exam.jsonl:1"}  # fmt: skip
    whole, continuations = encode_choice(item, [], tiny_tokenizer)
    (kept, _, shots, cut), *_ = build_choice_prompts([item], tiny_tokenizer, None, 0, 20)
    assert cut == len(whole) + 1 - 20 and kept == whole[-19:] and shots == 0


def test_skip_invalid_examples_skips_an_item_whose_answers_do_not_fit(byte_model, tmp_path):
    exam = [{"question": f"问题{i}", "options": ["是", "否"], "answer": "A"} for i in range(3)]
    exam[1]["options"] = ["是" * 3000, "否"]  # as an option text (--choice_target option), longer than the context
    data = write_jsonl(tmp_path / "exam.jsonl", exam)
    with pytest.raises(DataValidationError, match=f"{data}:2: error: options: its longest answer"):
        score(byte_model, data, tmp_path / "stopped", "--choice_target", "option")
    results = score(byte_model, data, tmp_path / "skipped", "--choice_target", "option", "--skip_invalid_examples")
    assert (results["items"], results["skipped"]) == (2, 1)
    assert [row["source"] for row in predictions(tmp_path / "skipped")] == [f"{data}:1", f"{data}:3"]


@pytest.mark.real_model
@pytest.mark.skipif(not RELEASED.is_dir(), reason="make released-benchmarks writes the released test sets")
def test_the_released_test_sets_score_to_the_end(byte_model, tmp_path):
    medqa_file, pubmedqa_file = RELEASED / "medqa" / "test.jsonl", RELEASED / "pubmedqa" / "ori_pqal.json"
    medqa = score(byte_model, medqa_file, tmp_path / "medqa", "--batch_size", "8")
    answers = collections.Counter(json.loads(line)["answer_idx"] for line in medqa_file.read_text().splitlines())
    assert medqa["items"] == 1273 and {s: v["items"] for s, v in medqa["subjects"].items()} == {
        "step1": 679, "step2&3": 594
    }  # fmt: skip
    assert (medqa["majority"], medqa["majority_answer"]) == (answers["B"] / 1273, "B")
    assert medqa["chance"] == pytest.approx(0.2)
    assert medqa["truncated"] == sum(row["truncated_tokens"] > 0 for row in predictions(tmp_path / "medqa")) > 0
    pubmedqa = score(byte_model, pubmedqa_file, tmp_path / "pubmedqa", "--batch_size", "8")
    assert pubmedqa["items"] == 500 and (pubmedqa["majority"], pubmedqa["majority_answer"]) == (0.552, "A")
    assert pubmedqa["truncated"] == sum(row["truncated_tokens"] > 0 for row in predictions(tmp_path / "pubmedqa"))
    print(
        f"MedQA test: {medqa['items']} items, acc {medqa['accuracy']:.3f}, truncated {medqa['truncated']}; "
        f"PubMedQA PQA-L test: {pubmedqa['items']} items, acc {pubmedqa['accuracy']:.3f}, "
        f"truncated {pubmedqa['truncated']}"
    )
