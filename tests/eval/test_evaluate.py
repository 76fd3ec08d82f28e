"""evaluate.py: the scorers measure what they claim (a fine-tuned model goes from chance to right), perplexity is
pretraining.py's, bad input is reported by path:line, and the text metrics have their textbook values."""

import json
import math

import pytest
import torch

import evaluate
import pretraining
import supervised_finetuning
from medicalgpt.cli import run_cli
from medicalgpt.eval.choice import encode_choice
from medicalgpt.eval.items import choice_conversation, choice_message, choice_text, load_eval_items, pick_shots
from medicalgpt.eval.perplexity import perplexity_windows
from medicalgpt.eval.text_metrics import text_scores, text_tokens
from tests.helpers import FAST_FLAGS, REPO, write_jsonl

EXAM = [  # answers spread over the letters: a model that always says the same letter scores about chance
    ("药理学", "青霉素最严重的不良反应是", ["胃肠道反应", "过敏性休克", "耳毒性", "肝损害"], "B"),
    ("药理学", "华法林过量出血时的拮抗药是", ["维生素K", "鱼精蛋白", "阿托品", "纳洛酮"], "A"),
    ("药理学", "下列属于ACEI的药物是", ["硝苯地平", "氯沙坦", "卡托普利", "依那普利"], "CD"),
    (
        "生理学",
        "正常成人安静时心率是",
        {"A": "40～60次/分", "B": "100～120次/分", "C": "很快", "D": "60～100次/分"},
        "D",
    ),
    ("生理学", "唯一能降低血糖的激素是", ["胰高血糖素", "肾上腺素", "胰岛素", "生长激素"], "C"),
    ("儿科学", "前囟一般闭合于", ["1～1.5岁", "出生时", "6～8周", "3岁以后"], "A"),
    ("儿科学", "口服补液盐的主要作用是", ["杀菌", "止泻", "补充维生素", "预防和纠正脱水"], "D"),
    ("pharmacology", "Which drug reverses an opioid overdose?", ["Atropine", "Naloxone", "Insulin", "Aspirin"], "B"),
    (
        "pharmacology",
        "Which of these are beta blockers?",
        ["Metoprolol", "Amlodipine", "Bisoprolol", "Lisinopril"],
        "A,C",
    ),
    (
        "physiology",
        "Which cells carry oxygen in the blood?",
        ["Platelets", "White cells", "Red cells", "Plasma cells"],
        "C",
    ),
]
EXAM = [dict(zip(("subject", "question", "options", "answer"), row)) for row in EXAM]
QA = [
    {"question": "感冒了怎么办？", "answer": "多休息，多喝水。"},
    {"question": "高血压吃什么药？", "answer": "请遵医嘱服用降压药。"},
    {"question": "What helps a sore throat?", "answer": "Warm water and rest."},
    {"question": "发烧几天要去医院？", "answer": "超过三天请就医。"},
]


def run_eval(*argv):
    return evaluate.main([*argv, "--template_name", "qwen"])


@pytest.fixture(scope="module")
def exam(tiny_model_dir, tmp_path_factory):
    """The files, and a tiny model fully fine-tuned on them (in-process SFT, choice accuracy logged during it)."""
    root = tmp_path_factory.mktemp("exam")
    choice_file, qa_file = write_jsonl(root / "exam.jsonl", EXAM), write_jsonl(root / "qa.jsonl", QA)
    items = load_eval_items(str(choice_file), "choice")
    sft = [{"messages": [{"role": "user", "content": choice_message(item)},
                         {"role": "assistant", "content": item["answer"]}]} for item in items]  # fmt: skip
    sft += [{"instruction": item["question"], "input": "", "output": item["answer"]} for item in QA]
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(write_jsonl(root / "sft.jsonl", sft))]
    argv += ["--do_train", "--template_name", "qwen", "--output_dir", str(root / "sft"), "--num_train_epochs", "50"]
    argv += ["--learning_rate", "3e-3", "--per_device_train_batch_size", "7", "--save_strategy", "no"]
    argv += ["--choice_eval_file", str(choice_file), "--choice_eval_steps", "25", "--logging_steps", "25"]
    supervised_finetuning.main([*argv, *FAST_FLAGS])
    return {"choice": str(choice_file), "qa": str(qa_file), "model": str(root / "sft"), "root": root}


def test_choice_accuracy_goes_from_chance_to_right_after_fine_tuning(exam, tiny_model_dir):
    out = exam["root"]
    before = run_eval("--task", "choice", "--base_model", tiny_model_dir, "--data_file", exam["choice"],
                      "--output_dir", str(out / "choice-before"))  # fmt: skip
    after = run_eval("--task", "choice", "--base_model", exam["model"], "--data_file", exam["choice"],
                     "--output_dir", str(out / "choice-after"), "--batch_size", "3")  # fmt: skip
    print(f"choice accuracy: before {before['accuracy']:.2f}, after {after['accuracy']:.2f}")
    assert before["accuracy"] <= 0.5 and after["accuracy"] >= 0.9
    assert before["chance"] == pytest.approx((8 / 4 + 2 / 6) / 10)
    assert set(after["subjects"]) == {"药理学", "生理学", "儿科学", "pharmacology", "physiology"}
    assert after["subjects"]["药理学"]["items"] == 3
    saved = json.loads((out / "choice-after" / "results.json").read_text())
    assert saved["accuracy"] == after["accuracy"] and saved["n_shot"] == 0
    rows = [json.loads(line) for line in (out / "choice-after" / "choice_predictions.jsonl").open()]
    assert [row["source"] for row in rows] == [f"{exam['choice']}:{i}" for i in range(1, 11)]
    multi = rows[8]  # "A,C": every 2-letter set is a candidate, the answer written sorted
    assert multi["answer"] == "A,C" and len(multi["scores"]) == 6 and multi["prediction"] == "AC"
    assert sum(row["correct"] for row in rows) == after["correct"]


def test_choice_accuracy_is_logged_during_fine_tuning(exam):
    state = json.loads((exam["root"] / "sft" / "trainer_state.json").read_text())
    logged = [
        (entry["step"], entry["choice_accuracy"]) for entry in state["log_history"] if "choice_accuracy" in entry
    ]
    steps = [step for step, _ in logged]
    assert steps[:2] == [25, 50] and steps[-1] == state["global_step"]
    assert logged[0][1] <= 0.5 and logged[-1][1] >= 0.9


def test_qa_rouge_rises_after_fine_tuning(exam, tiny_model_dir):
    out, flags = exam["root"], ["--task", "qa", "--data_file", exam["qa"], "--max_new_tokens", "24"]
    before = run_eval(*flags, "--base_model", tiny_model_dir, "--output_dir", str(out / "qa-before"))
    after = run_eval(*flags, "--base_model", exam["model"], "--output_dir", str(out / "qa-after"), "--batch_size", "3")
    print(f"QA ROUGE-L: before {before['rouge_l']:.1f}, after {after['rouge_l']:.1f}; BLEU {after['bleu']:.1f}")
    assert before["rouge_l"] < 30 and after["rouge_l"] > before["rouge_l"] + 50
    assert after["bleu_tokenize"] == "zh" and after["bleu"] > before["bleu"] + 30
    rows = [json.loads(line) for line in (out / "qa-after" / "qa_predictions.jsonl").open()]
    assert [row["answer"] for row in rows] == [item["answer"] for item in QA]
    assert sum(row["prediction"] == row["answer"] for row in rows) >= 3  # memorised, batch-generated, left-padded


def stream_length(tokenizer, texts):
    return sum(len(tokenizer(text)["input_ids"]) + 1 for text in texts)


@pytest.fixture(scope="module")
def full_blocks_text(tiny_tokenizer, tmp_path_factory):
    """Documents whose tokens (+ EOS each) fill exactly N blocks of 64: pretraining.py's eval_loss is then the
    mean over all its predicted tokens, comparable token for token."""
    lines = (REPO / "data" / "eval" / "perplexity.txt").read_text(encoding="utf-8").splitlines()[:3]
    filler = next(n for n in range(1, 65) if (stream_length(tiny_tokenizer, [*lines, "1" * n])) % 64 == 0)
    lines.append("1" * filler)  # digits are one token each
    path = tmp_path_factory.mktemp("ppl") / "heldout.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert stream_length(tiny_tokenizer, lines) % 64 == 0
    return path, lines


def test_perplexity_matches_pretraining_eval(tiny_model_dir, tiny_tokenizer, full_blocks_text, tmp_path):
    path, lines = full_blocks_text
    argv = ["--model_name_or_path", tiny_model_dir, "--validation_file_dir", str(path), "--do_eval"]
    argv += ["--block_size", "64", "--per_device_eval_batch_size", "3", "--output_dir", str(tmp_path / "pt")]
    pretraining.main([*argv, *FAST_FLAGS])
    eval_loss = json.loads((tmp_path / "pt" / "eval_results.json").read_text())["eval_loss"]
    ours = run_eval("--task", "perplexity", "--base_model", tiny_model_dir, "--data_file", str(path),
                    "--block_size", "64", "--output_dir", str(tmp_path / "ppl"))  # fmt: skip
    print(f"perplexity {ours['perplexity']:.4f} vs exp(eval_loss) {math.exp(eval_loss):.4f}")
    assert abs(ours["perplexity"] / math.exp(eval_loss) - 1) < 0.01
    assert ours["loss"] == pytest.approx(eval_loss, abs=1e-4)
    blocks = stream_length(tiny_tokenizer, lines) // 64
    assert ours["tokens"] == blocks * 63 and ours["documents"] == 4 and ours["windows"] == blocks
    rows = [json.loads(line) for line in (tmp_path / "ppl" / "perplexity_predictions.jsonl").open()]
    assert [row["source"] for row in rows] == [f"{path}:{i}" for i in range(1, 5)]
    assert sum(row["tokens"] for row in rows) == ours["tokens"]


def test_sliding_window_scores_every_token_once_with_its_context(
    tiny_model_dir, tiny_tokenizer, full_blocks_text, tmp_path
):
    from transformers import AutoModelForCausalLM

    path, _ = full_blocks_text
    flags = ["--task", "perplexity", "--base_model", tiny_model_dir, "--data_file", str(path)]
    whole = run_eval(*flags, "--block_size", "4096", "--output_dir", str(tmp_path / "a"))
    sliding = run_eval(*flags, "--block_size", "64", "--stride", "16", "--output_dir", str(tmp_path / "b"))
    blocks = run_eval(*flags, "--block_size", "64", "--output_dir", str(tmp_path / "c"))
    n = whole["tokens"] + 1
    assert sliding["tokens"] == n - 1 and blocks["tokens"] == n - n // 64 and sliding["windows"] == (n - 64) // 16 + 1
    # one window over everything: the model's own loss over the stream
    eos = tiny_tokenizer.eos_token_id
    stream = [token for line in path.read_text().splitlines() for token in tiny_tokenizer(line)["input_ids"] + [eos]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([stream]), labels=torch.tensor([stream])).loss.item()
    assert whole["loss"] == pytest.approx(loss, abs=1e-4)
    # the sliding window as transformers' perplexity guide computes it, one window at a time, the context masked
    ids, nll, scored_to = torch.tensor([stream]), 0.0, 0
    for begin in range(0, n, 16):
        end = min(begin + 64, n)
        labels = ids[:, begin:end].clone()
        labels[:, : max(scored_to, begin + 1) - begin] = -100
        with torch.no_grad():
            nll += model(input_ids=ids[:, begin:end], labels=labels).loss.item() * (end - max(scored_to, begin + 1))
        scored_to = end
        if end == n:
            break
    assert sliding["loss"] == pytest.approx(nll / (n - 1), abs=1e-4)
    assert sliding["loss"] != pytest.approx(blocks["loss"], abs=1e-3)


def test_perplexity_windows():
    assert perplexity_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert perplexity_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert perplexity_windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # a last block of one token predicts nothing
    assert perplexity_windows(3, 8, 2) == [(0, 3, 1)]


def test_bad_input_is_reported_by_path_and_line_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {"question": "q", "options": ["x", "y"], "answer": "A"}
    lines = [good, {**good, "answer": "C"}, {**good, "options": {"A": "x", "AB": "y"}}, {"question": "", "answer": 1},
             "not json", {**good, "answer": "AA"}, [1], {**good, "options": ["x"]}]  # fmt: skip
    bad.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--task", "choice", "--base_model", str(tmp_path / "no-such-model"), "--data_file", str(bad)]
    assert run_cli(lambda: evaluate.main([*argv, "--output_dir", str(out)])) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: error: answer: C is not one of the options (A, B)" in err
    assert f"{bad}:3: error: options: option keys must be distinct letters A-Z, got 'AB'" in err
    assert f"{bad}:4: error: question: expected a non-empty string" in err
    assert (
        f"{bad}:4: error: options: expected an object" in err and f"{bad}:4: error: answer: expected the letter" in err
    )
    assert f"{bad}:5: error: invalid JSON" in err
    assert f"{bad}:6: error: answer: a letter appears twice in 'AA'" in err
    assert f"{bad}:7: error: expected a JSON object, got list" in err
    assert f"{bad}:8: error: options: expected an object" in err
    assert f"{bad}:1:" not in err and not out.exists()

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}, {"answer": "a"}])
    argv = ["--task", "qa", "--base_model", str(tmp_path / "no-such-model"), "--data_file", str(qa)]
    assert run_cli(lambda: evaluate.main([*argv, "--output_dir", str(out)])) == 1
    err = capsys.readouterr().err
    assert f"{qa}:2: error: answer: missing" in err and f"{qa}:3: error: question: missing" in err
    assert not out.exists()

    # the SFT hook checks its exam file before loading the model too
    argv = [
        "--model_name_or_path",
        str(tmp_path / "no-such-model"),
        "--train_file_dir",
        str(REPO / "data" / "finetune"),
    ]
    argv += ["--do_train", "--output_dir", str(out), "--choice_eval_file", str(bad), *FAST_FLAGS]
    assert run_cli(lambda: supervised_finetuning.main(argv)) == 1
    assert f"{bad}:2: error: answer: C is not one of the options (A, B)" in capsys.readouterr().err
    assert not out.exists()


def test_prompts_too_long_for_the_model_are_path_line_errors(tiny_model_dir, tmp_path, capsys):
    long = {"question": "发热" * 5000, "options": ["x", "y"], "answer": "A"}
    data = write_jsonl(tmp_path / "long.jsonl", [{"question": "q", "options": ["x", "y"], "answer": "B"}, long])
    argv = ["--task", "choice", "--base_model", tiny_model_dir, "--data_file", str(data), "--output_dir"]
    assert run_cli(lambda: run_eval(*argv, str(tmp_path / "out"))) == 1
    assert f"{data}:2: error: question: the prompt (" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_flags_exit_with_a_usage_message(tiny_model_dir):
    base = ["--base_model", tiny_model_dir, "--data_file", "x.txt", "--task"]
    for extra in (["perplexity", "--block_size", "8", "--stride", "9"], ["choice", "--n_shot", "-1"], ["exam"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*base, *extra])
        assert exit_info.value.code == 2


def test_sample_files_are_valid():
    choice = load_eval_items(str(REPO / "data" / "eval" / "choice.jsonl"), "choice")
    qa = load_eval_items(str(REPO / "data" / "eval" / "qa.jsonl"), "qa")
    assert len(choice) >= 20 and len({item["subject"] for item in choice}) >= 4 and len(qa) >= 10
    assert any(len(item["answer"]) > 1 for item in choice)


def test_few_shot_prompts_take_the_same_subject_first():
    items = [{"question": f"问题{i}", "options": {"A": "甲", "B": "乙"}, "answer": "AB"[i % 2], "subject": s}
             for i, s in enumerate(["内科", "儿科", "内科", "外科", "内科"])]  # fmt: skip
    assert [shot["question"] for shot in pick_shots(items, 0, 3)] == ["问题2", "问题4", "问题1"]
    assert pick_shots(items, 0, 0) == []
    messages = choice_conversation(items[0], pick_shots(items, 0, 2))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "A" and messages[3]["content"] == "A"
    header = "以下是一道关于内科的单项选择题，请直接给出正确答案的选项字母。"
    assert messages[4]["content"] == f"{header}\n\n问题0\nA. 甲\nB. 乙"
    text = choice_text(items[0], pick_shots(items, 0, 1))
    assert text == f"{header}\n\n问题2\nA. 甲\nB. 乙\n答案：A\n\n问题0\nA. 甲\nB. 乙\n答案："


def test_plain_prompts_score_the_letter_tokens_that_follow_the_cue(tiny_tokenizer):
    item = {"question": "Which cells carry oxygen?", "options": {"A": "Platelets", "B": "Red cells"}, "answer": "B",
            "subject": None}  # fmt: skip
    prompt, continuations = encode_choice(item, [], tiny_tokenizer)
    text = choice_text(item, [])
    assert text.endswith("B. Red cells\nAnswer:") and tiny_tokenizer.decode(prompt) == text
    for letter, ids in continuations.items():
        assert tiny_tokenizer.decode(prompt + ids) == f"{text} {letter}"


def test_text_metrics_have_their_textbook_values():
    assert text_tokens("Take 2 tablets, 多喝水！") == ["take", "2", "tablets", "多", "喝", "水"]
    rouge, bleu, corpus = text_scores(
        ["多喝水多睡觉", "take one tablet daily"], ["多喝水多休息", "take two tablets daily"]
    )
    # characters: LCS 多喝水多 = 4 of 6; words: LCS take..daily = 2 of 4
    assert rouge == pytest.approx([400 / 6, 50.0])
    # 1-4-gram precisions of 多喝水多睡觉 against 多喝水多休息: 4/6, 3/5, 2/4, 1/3; same length, no brevity penalty
    assert bleu[0] == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert corpus["bleu_tokenize"] == "zh" and corpus["rouge_l"] == pytest.approx((400 / 6 + 50) / 2)
    _, bleu, corpus = text_scores(["a b c d f"], ["a b c d e"])
    assert corpus["bleu_tokenize"] == "13a" and corpus["bleu"] == pytest.approx(
        100 * (4 / 5 * 3 / 4 * 2 / 3 / 2) ** 0.25
    )
    rouge, bleu, corpus = text_scores(["多喝水，多休息。"], ["多喝水，多休息。"])
    assert rouge == [100.0] and bleu[0] == pytest.approx(100.0) and corpus["bleu"] == pytest.approx(100.0)
    rouge, bleu, corpus = text_scores([""], ["多喝水"])
    assert rouge == [0.0] and corpus["bleu"] == 0.0


def test_skip_invalid_examples_skips_and_counts(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "q", "options": ["x", "y"], "answer": "B"}, {"q": 1}])
    argv = ["--task", "choice", "--base_model", tiny_model_dir, "--data_file", str(data), "--skip_invalid_examples"]
    results = run_eval(*argv, "--output_dir", str(tmp_path / "out"))
    assert results["items"] == 1 and results["chance"] == 0.5
    assert f"{data}: skipped 1 invalid records" in caplog.text and f"{data}:2: error: question: missing" in caplog.text


def test_plain_few_shot_prompts_on_a_base_model_with_an_adapter(tiny_model_dir, sft_adapter_dir, tmp_path):
    data = write_jsonl(tmp_path / "exam.jsonl", EXAM)
    argv = [
        "--task",
        "choice",
        "--base_model",
        tiny_model_dir,
        "--lora_model",
        sft_adapter_dir,
        "--data_file",
        str(data),
    ]
    results = evaluate.main(
        [*argv, "--prompt_format", "plain", "--n_shot", "2", "--output_dir", str(tmp_path / "out")]
    )
    assert results["prompt_format"] == "plain" and results["n_shot"] == 2 and results["items"] == 10
    rows = [json.loads(line) for line in (tmp_path / "out" / "choice_predictions.jsonl").open()]
    assert all(row["shots"] == 2 for row in rows) and len(rows[2]["scores"]) == 6  # "CD": six 2-letter sets
