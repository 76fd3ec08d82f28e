"""The public benchmarks in their released formats: each sample file read, detected and scored per subject;
malformed files reported by path:line with nothing written; MedMCQA's two cop conventions; the hub; the scores of
lm-evaluation-harness (acc, acc_norm, acc_bytes), the interval, and letters parsed from replies."""

import csv
import json

import pytest

import evaluate
from medicalgpt.cli import run_cli
from medicalgpt.eval.benchmarks import load_benchmark
from medicalgpt.eval.choice import build_choice_prompts, parse_choice, predictions, wilson_interval
from medicalgpt.eval.formats import detect_format, medmcqa_cop_base
from tests.helpers import REPO, write_jsonl

EVAL = REPO / "data" / "eval"
SAMPLES = {  # format: (path, items, {subject: items}, first source, first item's question start, answer, options)
    "ceval": ("ceval", 8, {"basic_medicine": 3, "clinical_medicine": 4, "law": 1}, "val/basic_medicine_val.csv:2",
              "正常成人的潮气量", "B", 4),
    "cmmlu": ("cmmlu", 5, {"anatomy": 3, "nutrition": 2}, "test/anatomy.csv:2", "成人脊髓下端", "B", 4),
    "mmlu": ("mmlu", 4, {"anatomy": 2, "medical_genetics": 2}, "test/anatomy_test.csv:1", "Which chamber", "B", 4),
    "cmb": ("cmb/CMB-val-merge.json", 4, {"临床执业医师": 2, "护士执业资格": 2}, "cmb/CMB-val-merge.json:2",
            "治疗有机磷", "B", 4),
    "cmexam": ("cmexam/val.csv", 4, {"儿科": 1, "外科": 1, "中医科": 1, "内科": 1}, "cmexam/val.csv:2",
               "新生儿生理性黄疸", "B", 4),
    "medqa": ("medqa/dev.jsonl", 3, {"step1": 2, "step2&3": 1}, "medqa/dev.jsonl:1", "A 24-year-old", "B", 5),
    "medmcqa": ("medmcqa/dev.json", 4, {"Pharmacology": 1, "Ophthalmology": 1, "Pediatrics": 1, "Pathology": 1},
                "medmcqa/dev.json:1", "Drug of choice", "C", 4),
    "pubmedqa": ("pubmedqa/ori_pqal.json", 3, {"(no subject)": 3}, "pubmedqa/ori_pqal.json:2",
                 "Abstract: Adults with mild", "A", 3),
}  # fmt: skip


def run_eval(*argv):
    return evaluate.main([*argv, "--template_name", "qwen"])


@pytest.mark.parametrize("fmt", SAMPLES)
def test_each_format_is_read_detected_and_scored_per_subject(fmt, tiny_model_dir, tmp_path):
    path, count, subjects, source, question, answer, options = SAMPLES[fmt]
    items, _ = load_benchmark(str(EVAL / path))
    first = items[0]
    assert len(items) == count and first["source"].endswith(source) and first["question"].startswith(question)
    assert first["answer"] == answer and len(first["options"]) == options
    file = EVAL / path if (EVAL / path).is_file() else EVAL / path / source.rsplit(":", 1)[0]
    assert detect_format(str(file)) == fmt
    out = tmp_path / fmt
    results = run_eval("--task", "choice", "--base_model", tiny_model_dir, "--data_file", str(EVAL / path),
                       "--output_dir", str(out))  # fmt: skip
    assert {name: s["items"] for name, s in results["subjects"].items()} == subjects
    assert results["items"] == count and results["format"] == "auto"
    rows = [json.loads(line) for line in (out / "choice_predictions.jsonl").open()]
    assert len(rows) == count and rows[0]["source"] == first["source"]
    assert sum(row["correct"] for row in rows) == results["correct"]


def test_sample_items_are_read_as_released():
    cmb = load_benchmark(str(EVAL / "cmb/CMB-val-merge.json"))[0]
    assert cmb[1]["answer"] == "ABD" and list(cmb[1]["options"]) == list("ABCD")  # its "E": "" is no option
    cmexam = load_benchmark(str(EVAL / "cmexam/val.csv"))[0]
    assert cmexam[2]["options"] == {"A": "桂枝汤", "B": "银翘散", "C": "麻黄汤", "D": "小柴胡汤", "E": "白虎汤"}
    assert cmexam[3]["answer"] == "AC" and cmexam[3]["source"].endswith("val.csv:15")  # a line per option
    medmcqa = load_benchmark(str(EVAL / "medmcqa/dev.json"))[0]
    assert [item["answer"] for item in medmcqa] == ["C", "A", "D", "B"]  # cop 3, 1, 4, 2 of the release (1-4)
    pubmedqa = load_benchmark(str(EVAL / "pubmedqa/ori_pqal.json"))[0]
    assert [item["answer"] for item in pubmedqa] == ["A", "B", "C"] and pubmedqa[1]["options"]["C"] == "maybe"
    assert pubmedqa[0]["question"].endswith("12 weeks. Resting systolic pressure fell by 7 mmHg more in the walking "
                                            "group than in the usual care group.\nQuestion: Does daily walking lower "
                                            "resting blood pressure in adults with mild hypertension?")  # fmt: skip
    assert [item["source"].rsplit(":", 1)[1] for item in pubmedqa] == ["2", "19", "36"]


def test_folders_score_one_split_and_take_shots_from_dev(tiny_tokenizer):
    items, shots = load_benchmark(str(EVAL / "ceval"), subjects="medical")
    assert {item["subject"] for item in items} == {"basic_medicine", "clinical_medicine"}  # law left out
    assert all("/val/" in item["source"] for item in items) and all("/dev/" in shot["source"] for shot in shots)
    clinical = next(i for i, item in enumerate(items) if item["subject"] == "clinical_medicine")
    prompts = build_choice_prompts(items, tiny_tokenizer, None, 1, 4096, shots)
    text = tiny_tokenizer.decode(prompts[clinical][0])
    assert text == (
        "以下是一道关于临床医学的单项选择题，请直接给出正确答案的选项字母。\n\n"
        "急性心肌梗死最早升高的心肌标志物是____\nA. 肌红蛋白\nB. 肌钙蛋白I\nC. 乳酸脱氢酶\nD. 碱性磷酸酶\n答案：A\n\n"
        "大叶性肺炎最常见的病原体是____\nA. 金黄色葡萄球菌\nB. 肺炎链球菌\nC. 肺炎克雷伯菌\nD. 流感嗜血杆菌\n答案："
    )
    cmmlu, _ = load_benchmark(str(EVAL / "cmmlu"), split="dev", subjects="anatomy")
    assert len(cmmlu) == 2 and all("/dev/" in item["source"] for item in cmmlu)


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def malformed_files(root):
    """(path, format, the errors expected) for a broken file of each format."""
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    ceval = write_csv(root / "ceval" / "val" / "anatomy_val.csv",
                      [header, [0, "q", "a", "b", "c", "d", "A", ""], [1, "q", "a", "b", "c", "d", "E", ""],
                       [2, "q", "a", "b", "c"]])  # fmt: skip
    cmmlu = write_csv(root / "cmmlu.csv", [["", "Question", "A", "B", "C", "D"], [0, "q", "a", "b", "c", "d"]])
    mmlu = write_csv(root / "mmlu_test.csv", [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "", "x"]])
    cmb = root / "cmb.json"
    cmb.write_text(json.dumps([{"exam_type": "t", "question": "q", "answer": "A", "option": {"A": "x", "B": "y"}},
                               {"exam_type": "t", "question": "q", "answer": "C", "option": {"A": "x", "B": "y"}}],
                              indent=1), encoding="utf-8")  # fmt: skip
    cmexam = write_csv(root / "cmexam.csv", [["Question", "Options", "Answer"], ["q", "A 甲\nB 乙", "B"],
                                             ["q", "甲\n乙", "A"]])  # fmt: skip
    medqa = root / "medqa.jsonl"
    medqa.write_text('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "F", "meta_info": "s"}\n'
                     "{not json\n", encoding="utf-8")  # fmt: skip
    medmcqa = write_jsonl(root / "medmcqa.jsonl", [{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                                    "cop": cop} for cop in (1, 9)])  # fmt: skip
    pubmedqa = root / "pubmedqa.json"
    pubmedqa.write_text(json.dumps({"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}, indent=2))
    return [
        (ceval.parent.parent, "ceval", [f"{ceval}:3: error: answer: E is not one of the options (A, B, C, D)",
                                        f"{ceval}:4: error: expected 8 cells"]),
        (cmmlu, "cmmlu", [f"{cmmlu}: error: answer: no answers in this file"]),
        (mmlu, "mmlu", [f"{mmlu}:2: error: expected 6 cells"]),
        (cmb, "cmb", [f"{cmb}:11: error: answer: C is not one of the options (A, B)"]),
        (cmexam, "cmexam", [f'{cmexam}:4: error: Options: expected one option a line, "A 选项"']),
        (medqa, "medqa", [f"{medqa}:1: error: answer: F is not one of the options (A, B)",
                          f"{medqa}:2: error: invalid JSON"]),
        (medmcqa, "medmcqa", [f"{medmcqa}:2: error: cop: 9 is not an option number (1-4: opa-opd)"]),
        (pubmedqa, "pubmedqa", [f"{pubmedqa}:2: error: final_decision: expected yes, no or maybe, got 'perhaps'"]),
    ]  # fmt: skip


def test_malformed_files_are_path_line_errors_with_nothing_written(tmp_path, capsys):
    for path, fmt, expected in malformed_files(tmp_path):
        out = tmp_path / f"out-{fmt}"
        argv = ["--task", "choice", "--base_model", str(tmp_path / "no-such-model"), "--data_file", str(path)]
        argv += ["--format", fmt, "--output_dir", str(out)]
        assert run_cli(lambda argv=argv: evaluate.main(argv)) == 1
        err = capsys.readouterr().err
        for line in expected:
            assert line in err, (fmt, err)
        assert not out.exists()


def test_a_test_split_without_answers_says_so(tmp_path, capsys):
    write_csv(tmp_path / "ceval" / "test" / "anatomy_test.csv", [["id", "question", "A", "B", "C", "D"],
                                                                 [0, "q", "a", "b", "c", "d"]])  # fmt: skip
    write_csv(tmp_path / "ceval" / "val" / "anatomy_val.csv", [["id", "question", "A", "B", "C", "D", "answer"],
                                                               [0, "q", "a", "b", "c", "d", "A"]])  # fmt: skip
    argv = ["--task", "choice", "--base_model", "x", "--data_file", str(tmp_path / "ceval"), "--split", "test"]
    assert run_cli(lambda: evaluate.main([*argv, "--output_dir", str(tmp_path / "out")])) == 1
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'ceval' / 'test' / 'anatomy_test.csv'}: error: answer: no answers in this file: C-Eval's " in err
    )
    assert "evaluate the val split" in err and not (tmp_path / "out").exists()
    assert len(load_benchmark(str(tmp_path / "ceval"))[0]) == 1  # the default split, val, has answers
    argv = ["--task", "choice", "--base_model", "x", "--data_file", str(tmp_path / "ceval"), "--split", "dev"]
    assert run_cli(lambda: evaluate.main([*argv, "--output_dir", str(tmp_path / "out")])) == 1
    assert "no dev/ folder (found: val, test); choose --split" in capsys.readouterr().err


def test_medmcqa_cop_is_read_as_the_release_or_the_hub_numbers_it(tmp_path, caplog):
    def answers(cops, name):
        rows = [{"question": f"q{cop}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop} for cop in cops]
        return [item["answer"] for item in load_benchmark(str(write_jsonl(tmp_path / name, rows)), "medmcqa")[0]]

    assert answers([1, 4, 2], "release.jsonl") == ["A", "D", "B"]
    assert answers([0, 3, 1], "hub.jsonl") == ["A", "D", "B"]
    assert answers([1, 2, 3], "ambiguous.jsonl") == ["A", "B", "C"] and "cop is only ever 1-3 here" in caplog.text
    assert medmcqa_cop_base({0, 4})[0] is None and medmcqa_cop_base({-1, None}) == (1, None)


def test_hub_names_load_through_datasets(monkeypatch):
    import datasets

    asked = []

    def load_dataset(name, config=None):
        asked.append((name, config))
        if name == "openlifescienceai/medmcqa":
            row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "subject_name": "Anatomy"}
            return datasets.DatasetDict(validation=datasets.Dataset.from_list([{**row, "cop": 0}, {**row, "cop": 3}]))
        row = {"id": 0, "question": f"{config} q", "A": "a", "B": "b", "C": "c", "D": "d", "explanation": ""}
        return datasets.DatasetDict({split: datasets.Dataset.from_list([{**row, "answer": "C"}])
                                     for split in ("dev", "val")})  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    items, shots = load_benchmark("ceval/ceval-exam", subjects="medical")
    assert [config for _, config in asked] == ["clinical_medicine", "basic_medicine", "physician"]
    assert [item["source"] for item in items][0] == "ceval/ceval-exam/clinical_medicine/val:1"
    assert items[0]["subject_name"] == "临床医学" and len(shots) == 3 and items[0]["answer"] == "C"
    items, shots = load_benchmark("openlifescienceai/medmcqa")
    assert [item["answer"] for item in items] == ["A", "D"] and shots is None  # the hub's cop is 0-3


def test_acc_norm_and_acc_bytes_divide_as_lm_eval_does():
    scores, texts = {"A": -3.0, "B": -4.0}, {"A": "是", "B": "ab"}  # 1 character, 3 bytes; 2 characters, 2 bytes
    assert predictions(scores, texts) == ("A", "B", "A")  # -3 > -4; -3/1 < -4/2; -3/3 > -4/2
    assert predictions({"A": -1.0, "B": -1.0}, {"A": "A", "B": "B"}) == ("A", "A", "A")  # ties: the first, as argmax


def test_wilson_interval_has_its_textbook_values():
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson_interval(0, 4) == pytest.approx([0.0, 0.4899], abs=1e-4)
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_letters_are_parsed_from_replies():
    single = {"options": {"A": "阿托品", "B": "纳洛酮", "C": "x", "D": "y"}, "answer": "B"}
    multi = {**single, "answer": "AC"}
    replies = [
        ("B", "B"),
        ("答案：C", "C"),
        ("The answer is (D).", "D"),
        ("I think the answer is A", "A"),
        ("应使用纳洛酮。", None),
        ("E", None),
        ("", None),
    ]  # fmt: skip  (an option's text is not a letter)
    for reply, expected in replies:
        assert parse_choice(reply, single) == expected, reply
    assert parse_choice("答案是C、A", multi) == "AC" and parse_choice("A,C", multi) == "AC"
