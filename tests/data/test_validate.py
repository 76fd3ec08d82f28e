"""The data validator (medicalgpt/data/validate.py) and validate_jsonl.py: exact reports on a corpus of broken files,
exact normalised records for every accepted shape, and the real upstream MedicalGPT files when the machine has them."""

import glob
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import validate_jsonl
from medicalgpt.data.validate import Issue, detect_stage, find_data_files, load_records, normalize_rows, validate_file
from medicalgpt.errors import DataValidationError
from tests.helpers import REPO

BROKEN = "tests/assets/broken"
VALID = "tests/assets/valid"
UPSTREAM = REPO.parent / "shared" / "data" / "upstream"
SHAREGPT_ROLES = "system, human, user, gpt, assistant, function_call, observation, tool"
SFT_SHAPES = "record has none of the SFT fields: expected 'conversations', 'messages' or 'instruction'+'output'"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Relative paths, so that reports read `tests/assets/...:line: ...`."""
    monkeypatch.chdir(REPO)


def report_lines(path, stage):
    report = validate_file(path, stage)
    return [str(issue) for issue in sorted(report.errors + report.warnings, key=lambda issue: issue.line)]


BROKEN_REPORTS = {
    "invalid_json.jsonl": ("sft", [
        "2: error: invalid JSON: Expecting ',' delimiter (column 22)",
        "3: error: invalid JSON: Extra data (column 41)",
        "5: error: invalid JSON: Expecting ',' delimiter (column 40)",
    ]),
    "not_utf8.jsonl": ("sft", ["2: error: not valid UTF-8 at byte offset 20"]),
    "not_object.jsonl": ("sft", [
        "1: error: expected a JSON object, got list",
        "2: error: expected a JSON object, got string",
        "3: error: expected a JSON object, got int",
        "4: error: expected a JSON object, got null",
    ]),
    "unknown_shape.jsonl": ("sft", [
        f"1: error: {SFT_SHAPES} (got keys: a, b)",
        f"2: error: {SFT_SHAPES} (got keys: none)",
        f"3: error: {SFT_SHAPES} (got keys: question, answer)",
    ]),
    "unknown_role.jsonl": ("sft", [
        f"3: error: conversations[1].from: unknown role 'bot' (expected one of: {SHAREGPT_ROLES})",
        "4: error: messages[1].role: unknown role 'gpt' "
        "(expected one of: system, user, assistant, tool, function_call)",
        f"5: error: conversations[1].from: unknown role 1 (expected one of: {SHAREGPT_ROLES})",
    ]),
    "non_string_content.jsonl": ("sft", [
        "1: error: conversations[1].value: expected a string, got int",
        "2: error: messages[0].content: expected a string, got list",
        "3: error: messages[1].content: expected a string, got null",
        "4: error: conversations[0].from: missing",
        "4: error: conversations[1].value: missing",
        "5: error: conversations[0]: expected an object with 'from' and 'value', got string",
        "5: error: conversations[1]: expected an object with 'from' and 'value', got string",
        "6: error: conversations: expected a non-empty list of messages, got string",
        "7: error: conversations: expected a non-empty list of messages, got an empty list",
    ]),
    "missing_output.jsonl": ("sft", [
        "1: error: output: missing",
        "2: error: instruction: expected a string, got int",
        "3: error: input: expected a string, got list",
        '4: error: history[1]: expected a [question, answer] pair of strings, got ["Only a question"]',
        "5: error: history: expected a list of [question, answer] pairs, got string",
    ]),
    "no_assistant_content.jsonl": ("sft", [
        "1: error: conversations: no assistant content to learn from",
        "2: error: conversations: no assistant content to learn from",
        "3: error: output: no assistant content to learn from",
        "4: error: messages: no assistant content to learn from",
    ]),
    "non_alternating.jsonl": ("sft", [
        "1: error: conversations[1]: two user-side turns in a row (human after human)",
        "2: error: conversations[0]: the conversation starts with an assistant-side turn (gpt)",
        "3: error: conversations[2]: two assistant-side turns in a row (gpt after function_call)",
        "4: error: conversations[1].from: a system message is only allowed first",
    ]),
    "bad_preference.jsonl": ("preference", [
        "1: error: rejected: missing",
        "2: error: chosen: empty",
        "3: error: rejected: expected a string or a list with one assistant message, got int",
        "4: error: conversations: the context must end with a user turn, not gpt (the response goes in chosen)",
        f"5: error: conversations[1].from: unknown role 'robot' (expected one of: {SHAREGPT_ROLES})",
        "6: error: chosen: expected a string or a list with one assistant message, got list",
        "7: error: response_rejected: missing",
        "8: error: prompt: expected a string, got int",
        "9: error: record has none of the preference fields: expected 'chosen'+'rejected' with 'prompt' or "
        "'conversations', or 'question'+'response_chosen'+'response_rejected' (got keys: chosen, rejected)",
        "10: error: conversations: the context has no user turn",
    ]),
    "bad_array.json": ("sft", [
        "6: error: expected a JSON object, got string",
        f"7: error: {SFT_SHAPES} (got keys: a)",
        f"8: error: conversations[1].from: unknown role 'bot' (expected one of: {SHAREGPT_ROLES})",
    ]),
    "bad_array_syntax.json": ("sft", [
        "4: error: invalid JSON: expected ',' or ']' after an array element; the rest is not read"
    ]),
    "wrong_stage.jsonl": ("sft", [
        "1: error: this looks like a preference record (it has 'chosen'/'rejected'), but the stage is sft",
        "2: error: this looks like a pt record (it has 'text'), but the stage is sft",
    ]),
    "bad_tools.jsonl": ("sft", [
        "1: error: tools: not valid JSON: Expecting ',' delimiter (column 20)",
        "2: error: tools: expected a JSON string, a list or an object, got int",
        "3: error: messages[1].tool_calls: expected a list with one tool call (one call per message), got 2 calls",
        "4: error: messages[1].tool_calls[0].function.arguments: not valid JSON: "
        "Expecting property name enclosed in double quotes (column 2)",
        "5: error: system: expected a string, got list",
        "6: error: system: differs from the conversation's own system message",
    ]),
    "bad_pt.jsonl": ("pt", [
        "1: error: text: expected a string, got int",
        "3: warning: text: empty; the record is left out",
        "4: error: text: expected a string, got null",
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN_REPORTS))
def test_broken_file_reports_every_problem_exactly(name):
    stage, expected = BROKEN_REPORTS[name]
    assert report_lines(f"{BROKEN}/{name}", stage) == [f"{BROKEN}/{name}:{line}" for line in expected]


def test_every_broken_file_has_its_expected_report():
    assert sorted(os.listdir(BROKEN)) == sorted(BROKEN_REPORTS)


def test_broken_files_keep_their_good_records():
    """A bad line does not stop the rest of the file (or of a JSON array) from validating."""
    expected = {"invalid_json.jsonl": [1], "not_utf8.jsonl": [1, 3], "bad_array.json": [2, 14]}
    expected |= {"bad_array_syntax.json": [2, 3], "unknown_role.jsonl": [1, 2], "wrong_stage.jsonl": [3]}
    for name, lines in expected.items():
        records = validate_file(f"{BROKEN}/{name}", "sft").records
        assert [record["source"] for record in records] == [f"{BROKEN}/{name}:{line}" for line in lines]


def sft(*messages, system=None, tools=None, source):
    roles = {"u": "user", "a": "assistant", "f": "function_call", "o": "observation"}
    turns = [{"role": roles[role], "content": content} for role, content in messages]
    return {"messages": turns, "system": system, "tools": tools, "source": f"{VALID}/{source}"}


def pref(*messages, chosen, rejected, system=None, tools=None, source):
    record = sft(*messages, system=system, tools=tools, source=f"preference/{source}")
    return {**record, "chosen": chosen, "rejected": rejected, "source": record.pop("source")}


PARIS_CALL = '{"name": "weather", "arguments": {"city": "Paris"}}'
VALID_RECORDS = {
    "sft/alpaca.jsonl": [
        sft(("u", "小孩发烧怎么办"), ("a", "发烧是身体对感染的反应。"), source="sft/alpaca.jsonl:1"),
        sft(("u", "Translate to French.\nGood morning"), ("a", "Bonjour"), source="sft/alpaca.jsonl:2"),
        sft(
            ("u", "What is paracetamol?"), ("a", "A painkiller."), ("u", "And the dose for adults?"), ("a", "500 mg."),
            system="You are a pharmacist.", source="sft/alpaca.jsonl:3",
        ),
    ],
    "sft/sharegpt.jsonl": [
        sft(("u", "你好"), ("a", "你好！有什么可以帮助你的吗？"), source="sft/sharegpt.jsonl:1"),
        sft(
            ("u", "Hi"), ("a", "Hello!"), ("u", "Bye"), ("a", "Bye!"), system="Be brief.",
            source="sft/sharegpt.jsonl:2",
        ),
        sft(
            ("u", "Weather in Paris?"), ("f", PARIS_CALL), ("o", '{"sky": "sunny"}'), ("a", "Sunny."),
            tools='[{"name": "weather", "parameters": {"type": "object"}}]', source="sft/sharegpt.jsonl:3",
        ),
        sft(
            ("u", "Weather in Rome?"), ("f", '{"name": "weather", "arguments": {"city": "Rome"}}'),
            ("o", '{"sky": "rain"}'), ("a", "Rainy."),
            system="Use tools.", tools='[{"name": "weather", "description": "天气"}]', source="sft/sharegpt.jsonl:4",
        ),
    ],
    "sft/messages.jsonl": [
        sft(("u", "Hi"), ("a", "Hello!"), system="Be brief.", source="sft/messages.jsonl:1"),
        sft(
            ("u", "Weather in Paris?"), ("f", PARIS_CALL), ("o", "sunny"), ("a", "Sunny."),
            tools='[{"type": "function", "function": {"name": "weather"}}]', source="sft/messages.jsonl:2",
        ),
    ],
    "sft/array.json": [
        sft(("u", "What is a fever?"), ("a", "A raised body temperature."), source="sft/array.json:2"),
        sft(("u", "Hi"), ("a", "Hello!"), source="sft/array.json:7"),
    ],
    "sft/with_warnings.jsonl": [
        sft(("u", "Hi"), ("a", "Hello!"), source="sft/with_warnings.jsonl:1"),
        sft(("u", "Hi"), ("a", "Hello!"), ("u", " "), ("a", "Anything else?"), source="sft/with_warnings.jsonl:2"),
        sft(("u", "Hi"), ("a", ""), ("u", "Hello?"), ("a", "Sorry, hello!"), source="sft/with_warnings.jsonl:3"),
        sft(
            ("u", "Discount on 200?"), ("a", "Let me compute it."), ("o", '{"price": 160}'), ("a", "160."),
            source="sft/with_warnings.jsonl:4",
        ),
    ],
    "preference/prompt_chosen_rejected.jsonl": [
        pref(
            ("u", "What is a fever?"), chosen="A raised body temperature.", rejected="No idea.",
            source="prompt_chosen_rejected.jsonl:1",
        ),
        pref(
            ("u", "What is paracetamol?"), ("a", "A painkiller."), ("u", "And the dose?"), chosen="500 mg.",
            rejected="Lots.", system="You are a pharmacist.", source="prompt_chosen_rejected.jsonl:3",
        ),
    ],
    "preference/sharegpt_chosen_rejected.jsonl": [
        pref(
            ("u", "Hi"), chosen="Hello!", rejected="Go away.", system="Be brief.",
            source="sharegpt_chosen_rejected.jsonl:1",
        ),
        pref(
            ("u", "Weather?"), ("f", '{"name": "weather", "arguments": {}}'), ("o", "sunny"), chosen="It is sunny.",
            rejected="Sunny.", tools='[{"name": "weather"}]', source="sharegpt_chosen_rejected.jsonl:2",
        ),
        pref(("u", "Hi"), chosen="Hello!", rejected="Hello!", source="sharegpt_chosen_rejected.jsonl:3"),
    ],
    "preference/messages_chosen_rejected.jsonl": [
        pref(
            ("u", "Hi"), ("a", "Hello!"), ("u", "Bye"), chosen="Bye!", rejected="Whatever.", system="Be brief.",
            source="messages_chosen_rejected.jsonl:1",
        ),
    ],
    "preference/question_response.json": [
        pref(
            ("u", "What is a fever?"), chosen="A raised body temperature.", rejected="No idea.",
            source="question_response.json:2",
        ),
        pref(
            ("u", "What is paracetamol?"), ("a", "A painkiller."), ("u", "And the dose?"), chosen="500 mg.",
            rejected="Lots.", system="You are a pharmacist.", source="question_response.json:3",
        ),
    ],
    "pt/corpus.txt": [  # BOM, CRLF, blank and whitespace-only lines; no newline at the end
        {"text": "A fever is a raised body temperature.", "source": f"{VALID}/pt/corpus.txt:1"},
        {"text": "  Indented line, kept as is.  ", "source": f"{VALID}/pt/corpus.txt:4"},
        {"text": "Last line without newline", "source": f"{VALID}/pt/corpus.txt:5"},
    ],
    "pt/corpus.jsonl": [
        {"text": "Paracetamol is a painkiller.", "source": f"{VALID}/pt/corpus.jsonl:1"},
        {"text": "发烧是身体对感染的反应。", "source": f"{VALID}/pt/corpus.jsonl:3"},
    ],
}  # fmt: skip
VALID_KINDS = {
    "sft/alpaca.jsonl": {"alpaca": 3},
    "sft/sharegpt.jsonl": {"sharegpt": 4},
    "sft/messages.jsonl": {"messages": 2},
    "sft/array.json": {"alpaca": 1, "sharegpt": 1},
    "sft/with_warnings.jsonl": {"sharegpt": 4},
    "preference/prompt_chosen_rejected.jsonl": {"prompt_chosen_rejected": 2},
    "preference/sharegpt_chosen_rejected.jsonl": {"sharegpt_chosen_rejected": 3},
    "preference/messages_chosen_rejected.jsonl": {"messages_chosen_rejected": 1},
    "preference/question_response.json": {"question_response_chosen_rejected": 2},
    "pt/corpus.txt": {"text": 3},
    "pt/corpus.jsonl": {"text": 2},
}


@pytest.mark.parametrize("name", sorted(VALID_RECORDS))
@pytest.mark.parametrize("stage", ["given", "inferred"])
def test_valid_shapes_normalise_exactly(name, stage):
    report = validate_file(f"{VALID}/{name}", name.split("/")[0] if stage == "given" else None)
    assert report.errors == []
    assert report.records == VALID_RECORDS[name]
    assert report.kinds == VALID_KINDS[name]
    assert report.turns == sum(len(r.get("messages", ())) + ("chosen" in r) for r in VALID_RECORDS[name])


def test_every_valid_file_has_its_expected_records():
    assert sorted(str(p.relative_to(VALID)) for p in Path(VALID).rglob("*") if p.is_file()) == sorted(VALID_RECORDS)


def test_warnings_for_records_that_still_train():
    expected = [
        "sft/with_warnings.jsonl:1: warning: conversations[2]: the conversation ends with a user turn (human); "
        "it is not trained on",
        "sft/with_warnings.jsonl:2: warning: conversations[2].value: empty user turn",
        "sft/with_warnings.jsonl:3: warning: conversations[1].value: empty assistant turn",
        "sft/with_warnings.jsonl:4: warning: conversations[2]: a tool result (observation) follows gpt, "
        "not a function_call",
        "preference/sharegpt_chosen_rejected.jsonl:3: warning: rejected: same text as chosen; "
        "the pair teaches nothing",
    ]
    got = report_lines(f"{VALID}/sft/with_warnings.jsonl", "sft")
    got += report_lines(f"{VALID}/preference/sharegpt_chosen_rejected.jsonl", "preference")
    assert got == [f"{VALID}/{line}" for line in expected]


def test_openai_tool_call_beside_text_warns(caplog):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [{"function": {"name": "w"}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        }
    ]
    with caplog.at_level(logging.WARNING, logger="medicalgpt.data.validate"):
        [record] = normalize_rows(rows, "sft", "rows")
    assert (
        "rows:1: warning: messages[1].content: text beside tool_calls is not trained on (only the call is)"
        in caplog.text
    )
    assert record["messages"][1] == {"role": "function_call", "content": '{"name": "w", "arguments": {}}'}


def test_detect_stage():
    assert detect_stage({"prompt": "q", "chosen": "a", "rejected": "b"}) == "preference"
    assert detect_stage({"question": "q", "response_chosen": "a", "response_rejected": "b"}) == "preference"
    assert detect_stage({"conversations": [], "chosen": "a"}) == "preference"
    assert detect_stage({"conversations": []}) == "sft"
    assert detect_stage({"messages": []}) == "sft"
    assert detect_stage({"instruction": "q"}) == "sft"
    assert detect_stage({"text": "t"}) == "pt"
    assert detect_stage({"question": "q", "answer": "a"}) is None
    assert detect_stage(["text"]) is None


def test_issue_format():
    assert str(Issue("a.jsonl", 3, "error", "output", "missing")) == "a.jsonl:3: error: output: missing"
    assert str(Issue("a.jsonl", 3, "warning", "", "odd")) == "a.jsonl:3: warning: odd"
    assert str(Issue("a.jsonl", 0, "error", "", "cannot read")) == "a.jsonl: error: cannot read"


def test_find_data_files(tmp_path):
    for name in ["b/z.jsonl", "b/a.txt", "a.json", "c/d/e.jsonl", "notes.md", ".hidden/x.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    root = str(tmp_path)
    expected = [f"{root}/a.json", f"{root}/b/z.jsonl", f"{root}/c/d/e.jsonl"]
    assert find_data_files(root, "sft") == expected
    assert find_data_files([root], "preference") == expected
    assert find_data_files(root, "pt") == [f"{root}/a.json", f"{root}/b/a.txt", f"{root}/b/z.jsonl", expected[2]]
    assert find_data_files([f"{root}/b/z.jsonl", root], "sft") == [expected[1], expected[0], expected[2]]
    assert find_data_files(f"{root}/b", None) == [f"{root}/b/a.txt", f"{root}/b/z.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"/c/d/nothing: no such file or directory"):
        find_data_files([root, f"{root}/c/d/nothing"], "sft")
    (tmp_path / "only_md").mkdir()
    (tmp_path / "only_md" / "x.md").write_text("")
    with pytest.raises(FileNotFoundError, match=r"only_md: no \.json \.jsonl files in this directory or below"):
        find_data_files(f"{root}/only_md", "sft")
    with pytest.raises(ValueError, match=r"a\.txt: not a sft file \(expected \.json \.jsonl\)"):
        find_data_files(f"{root}/b/a.txt", "sft")
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        find_data_files(root, "dpo")


def test_txt_is_pt_only_and_unreadable_files_are_reported(tmp_path):
    assert report_lines(f"{VALID}/pt/corpus.txt", "sft") == [
        f"{VALID}/pt/corpus.txt: error: a .txt file holds pt text, not sft data"
    ]
    assert report_lines(str(tmp_path), "sft") == [f"{tmp_path}: error: cannot read the file: Is a directory"]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert report_lines(str(tmp_path / "empty.jsonl"), "sft") == [
        f"{tmp_path}/empty.jsonl: warning: no records in this file"
    ]


def test_json_array_edge_cases(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n {"text": "ok"},\n {"text": "caf\xe9"},\n {"text": "fine"}\n]\n')
    report = validate_file(str(path), "pt")
    assert [str(e) for e in report.errors] == [f"{path}:3: error: not valid UTF-8 at byte offset 14"]
    assert [r["text"] for r in report.records] == ["ok", "fine"]
    path.write_bytes(b'\xef\xbb\xbf  [{"text": "ok"}]\n')
    assert validate_file(str(path), "pt").records == [{"text": "ok", "source": f"{path}:1"}]
    path.write_text('[{"text": "ok"}] {"text": "extra"}')
    assert [str(e) for e in validate_file(str(path), "pt").errors] == [
        f"{path}:1: error: invalid JSON: extra data after the array's closing ']'"
    ]
    path.write_text('[{"text": "ok"},\n {"text": "open"')
    assert [str(e) for e in validate_file(str(path), "pt").errors] == [
        f"{path}:2: error: invalid JSON: Expecting ',' delimiter (column 17); the rest of the array is not read"
    ]


def test_load_records_raises_with_every_error_of_every_file():
    files = [f"{BROKEN}/unknown_role.jsonl", f"{BROKEN}/wrong_stage.jsonl"]
    with pytest.raises(DataValidationError) as caught:
        load_records(files, "sft")
    expected = [
        f"{BROKEN}/{name}:{line}"
        for name in ("unknown_role.jsonl", "wrong_stage.jsonl")
        for line in BROKEN_REPORTS[name][1]
    ]
    assert [str(issue) for issue in caught.value.errors] == expected
    assert str(caught.value).splitlines() == [
        *map(str, caught.value.errors),
        "Fix these records, or pass --skip_invalid_examples to skip them.",
    ]


def test_load_records_shows_the_first_20_errors(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(f'{{"instruction": "q{i}"}}\n' for i in range(25)) + '{"instruction": "q", "output": "a"}\n'
    )
    with pytest.raises(DataValidationError) as caught:
        load_records([str(tmp_path)], "sft")
    assert len(caught.value.errors) == 25
    lines = str(caught.value).splitlines()
    assert lines[:20] == [f"{path}:{i}: error: output: missing" for i in range(1, 21)]
    assert lines[20:] == ["... and 5 more errors", "Fix these records, or pass --skip_invalid_examples to skip them."]
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.errors == caught.value.errors and str(copy) == str(caught.value)


def test_skip_invalid_returns_only_valid_records_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="medicalgpt.data.validate"):
        records = load_records([f"{BROKEN}/unknown_role.jsonl", f"{VALID}/sft/sharegpt.jsonl"], "sft", True)
    assert [r["source"] for r in records] == [f"{BROKEN}/unknown_role.jsonl:{i}" for i in (1, 2)] + [
        f"{VALID}/sft/sharegpt.jsonl:{i}" for i in (1, 2, 3, 4)
    ]
    assert f"{BROKEN}/unknown_role.jsonl: skipped 3 invalid records (--skip_invalid_examples)" in caplog.text
    assert f"{BROKEN}/unknown_role.jsonl:3: error: conversations[1].from: unknown role 'bot'" in caplog.text
    with pytest.raises(DataValidationError, match="no_assistant_content.jsonl: error: no usable records"):
        load_records([f"{BROKEN}/no_assistant_content.jsonl"], "sft", skip_invalid=True)


def test_load_records_logs_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="medicalgpt.data.validate"):
        records = load_records([f"{VALID}/sft"], "sft")
    assert len(records) == 15
    assert "4 data warnings:" in caplog.text
    assert f"{VALID}/sft/with_warnings.jsonl:2: warning: conversations[2].value: empty user turn" in caplog.text


@pytest.mark.parametrize("stage,count", [("pt", 5), ("sft", 15), ("preference", 8)])
def test_normalised_records_make_a_dataset(stage, count):
    """One schema per stage: datasets.Dataset.from_list takes the records as they are."""
    dataset = datasets.Dataset.from_list(load_records([f"{VALID}/{stage}"], stage))
    assert len(dataset) == count
    assert "source" in dataset.column_names


def test_normalize_rows_ignores_columns_that_datasets_filled_with_none():
    rows = [
        {"instruction": "q", "input": None, "output": "a", "conversations": None, "system": None, "history": None},
        {"instruction": None, "input": None, "output": None, "conversations": [{"from": "human", "value": "q"}]},
    ]
    with pytest.raises(DataValidationError) as caught:
        normalize_rows(rows, "sft", "hub[train]")
    assert [str(e) for e in caught.value.errors] == [
        "hub[train]:2: error: conversations: no assistant content to learn from"
    ]
    records = normalize_rows(rows, "sft", "hub[train]", skip_invalid=True)
    assert records == [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "system": None,
         "tools": None, "source": "hub[train]:1"}
    ]  # fmt: skip


def test_validate_jsonl_reports_and_fails_on_broken_files(capsys):
    assert validate_jsonl.main([f"{BROKEN}/unknown_role.jsonl", f"{BROKEN}/bad_pt.jsonl", "--stage", "sft"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"{BROKEN}/unknown_role.jsonl:{line}" for line in BROKEN_REPORTS["unknown_role.jsonl"][1]] + [
        f"{BROKEN}/unknown_role.jsonl: 2 records (kinds: sharegpt 1, messages 1), 4 turns, 3 errors, 0 warnings"
    ]
    assert out[-1] == "total: 2 files, 2 records, 4 turns, 7 errors, 0 warnings"
    assert validate_jsonl.main([f"{BROKEN}/bad_pt.jsonl", "--stage", "pt", "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{BROKEN}/bad_pt.jsonl:1: error: text: expected a string, got int",
        f"{BROKEN}/bad_pt.jsonl:4: error: text: expected a string, got null",
        "total: 1 files, 1 records, 0 turns, 2 errors, 1 warnings",
    ]


def test_validate_jsonl_passes_valid_controls(capsys):
    assert validate_jsonl.main([VALID]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{VALID}/sft/array.json: 2 records (kinds: alpaca 1, sharegpt 1), 4 turns, 0 errors, 0 warnings" in out
    assert f"{VALID}/sft/with_warnings.jsonl:2: warning: conversations[2].value: empty user turn" in out
    assert out[-1] == "total: 11 files, 28 records, 70 turns, 0 errors, 5 warnings"
    assert validate_jsonl.main([f"{VALID}/sft", "--stage", "sft", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == ["total: 5 files, 15 records, 46 turns, 0 errors, 4 warnings"]


def test_validate_jsonl_missing_path_fails(capsys):
    assert validate_jsonl.main([f"{VALID}/pt", "no/such/dir"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "error: no/such/dir: no such file or directory"
    assert out[-1] == "total: 2 files, 5 records, 0 turns, 0 errors, 0 warnings"


def test_validate_jsonl_command_line_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "validate_jsonl.py", BROKEN], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{BROKEN}/not_utf8.jsonl:2: error: not valid UTF-8 at byte offset 20" in result.stdout.splitlines()


UPSTREAM_ERRORS = {  # records that cannot be trained on
    "sft/sharegpt_zh_1K_format.jsonl": ["781: error: conversations: no assistant content to learn from"],
}
UPSTREAM_FILES = sorted(glob.glob(str(UPSTREAM / "sft" / "*.jsonl")) + glob.glob(str(UPSTREAM / "reward" / "*.jsonl")))


@pytest.mark.skipif(not UPSTREAM_FILES, reason="upstream MedicalGPT data not on this machine")
@pytest.mark.parametrize("path", UPSTREAM_FILES, ids=lambda path: os.path.basename(path))
def test_upstream_files_load(path):
    path = os.path.relpath(path, REPO)
    name = "/".join(Path(path).parts[-2:])
    report = validate_file(path, "sft" if name.startswith("sft/") else "preference")
    assert [str(e) for e in report.errors] == [f"{path}:{line}" for line in UPSTREAM_ERRORS.get(name, [])]
    assert report.records, path
    if "toolcall" in name:
        assert all(record["tools"] for record in report.records)
        assert any(m["role"] == "function_call" for r in report.records for m in r["messages"])


def test_validate_units_reports_table_rows_by_the_line_they_start_on(tmp_path):
    from medicalgpt.data.files import read_table
    from medicalgpt.data.validate import validate_units

    path = tmp_path / "qa.tsv"
    path.write_bytes('q\ta\n"多行\n问题"\t回答\n\n坏\t'.encode() + b"\xff\n" + "第三\t\n".encode())
    rows = list(read_table(str(path)))
    assert rows == [
        (1, ["q", "a"], None), (2, ["多行\n问题", "回答"], None), (5, None, "not valid UTF-8"),
        (6, ["第三", ""], None),
    ]  # fmt: skip
    units = ((line, {"instruction": cells[0], "output": cells[1]} if cells else None, problem)
             for line, cells, problem in rows[1:])  # fmt: skip
    report = validate_units(str(path), units, "sft")
    assert [str(e) for e in report.errors] == [
        f"{path}:5: error: not valid UTF-8",
        f"{path}:6: error: output: no assistant content to learn from",
    ]
    assert report.records == [
        {"messages": [{"role": "user", "content": "多行\n问题"}, {"role": "assistant", "content": "回答"}],
         "system": None, "tools": None, "source": f"{path}:2"}
    ]  # fmt: skip
