"""The public medical benchmarks, read from the files their authors release, as choice items.

    ceval     C-Eval: per-subject CSV `id,question,A,B,C,D,answer,explanation` (<subject>_dev/_val/_test.csv in
              dev/, val/, test/); the test split has no answers (they are scored on C-Eval's server).
    cmmlu     CMMLU: per-subject CSV `,Question,A,B,C,D,Answer` (<subject>.csv in dev/ and test/).
    mmlu      MMLU: per-subject CSV without a header, `question,A,B,C,D,answer` (<subject>_dev/_val/_test.csv).
    cmb       CMB-Exam: a JSON list of {exam_type, exam_class, exam_subject, question, answer, question_type,
              option: {"A": ..., ...}}; single and multiple answers ("ACD"). Subject: exam_subject.
    cmexam    CMExam: CSV with `Question`, `Options` (one option a line, "A 选项"), `Answer` ("A" or "ACD") and
              annotation columns (`Explanation`, ...); columns as read by its repository's own scripts
              (github.com/williamliujl/CMExam, src/preprocess/generate_prompt.py). Subject: the first of the
              annotation columns `Clinical Department`, `Subject`, `Medical Discipline` present, else none.
    medqa     MedQA (USMLE and MCMLE): JSON lines {question, options: {"A": ..., "E": ...}, answer_idx, meta_info}.
              Subject: meta_info (e.g. step1).
    medmcqa   MedMCQA: JSON lines {question, opa, opb, opc, opd, cop, subject_name}. `cop` is 1-4 in the original
              release (github.com/medmcqa/medmcqa) and 0-3 on the Hugging Face hub (openlifescienceai/medmcqa):
              a file with a 0 is read as 0-3, a file with a 4 as 1-4, a file with neither (only 1-3) as 1-4 (the
              release's), with a warning; a file with both is an error. cop -1 or missing: no answer (test split).
    pubmedqa  PubMedQA: a JSON object {pubid: {QUESTION, CONTEXTS: [...], final_decision, ...}}; options yes / no
              / maybe, the contexts in the prompt ("Abstract: ... Question: ...").

Every row is checked before any model loads; problems are `path:line` (the line a CSV row or JSON record starts
on). A file whose rows have no answers at all (a test split) is one error saying so.
"""

import json
import logging
import os
import re

from medicalgpt.data.files import read_table, read_units
from medicalgpt.data.validate import Issue
from medicalgpt.eval.items import LETTERS, _choice_item

logger = logging.getLogger(__name__)
FORMATS = ("jsonl", "ceval", "cmmlu", "mmlu", "cmb", "cmexam", "medqa", "medmcqa", "pubmedqa")
NO_ANSWERS = {
    "ceval": "C-Eval's test split ships without answers (they are scored on its server): evaluate the val split",
    "cmb": "CMB-Exam's test file ships without answers: evaluate CMB-val",
    "medmcqa": "MedMCQA's test split has no answers (cop missing or -1): evaluate the dev split",
    "cmexam": "a CMExam file without answers: evaluate val.csv or test.csv",
}
CMEXAM_SUBJECT_COLUMNS = ("Clinical Department", "Subject", "Medical Discipline")
_OPTION_LINE = re.compile(r"^\s*([A-Za-z])\s*[.、．:：)）]?\s*(.*?)\s*$")


def read_rows(path, fmt):
    """(rows, issues): rows are (line, fields, record) with fields {question, options, answer, subject} still to
    be validated; issues are the problems of reading (bad CSV, bad JSON, missing columns)."""
    reader = {"ceval": _ceval, "cmmlu": _cmmlu, "mmlu": _mmlu, "cmexam": _cmexam, "cmb": _cmb, "medqa": _medqa,
              "medmcqa": _medmcqa, "pubmedqa": _pubmedqa}[fmt]  # fmt: skip
    rows, issues = [], []
    for line, fields, record, problem in reader(path):
        if problem:
            issues.append(Issue(path, line, "error", "", problem))
        else:
            rows.append((line, fields, record))
    return rows, issues


def check_rows(path, fmt, rows, subject=None):
    """Validate read rows as choice items -> (items, issues). `subject` (a per-subject file's name) fills in rows
    that carry none."""
    if rows and all(_blank(fields.get("answer")) for _, fields, _ in rows):
        hint = NO_ANSWERS.get(fmt, "nothing to score against")
        return [], [Issue(path, 0, "error", "answer", f"no answers in this file: {hint}")]
    items, issues = [], []
    for line, fields, record in rows:
        problems = []
        item = _choice_item({**fields, "subject": fields.get("subject") or subject}, problems)
        issues += [Issue(path, line, "error", where, message) for where, message in problems]
        if not problems:
            items.append({**item, "source": f"{path}:{line}", "record": record})
    return items, issues


def _blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


# -- detection ---------------------------------------------------------------------------------------------------


def detect_format(path):
    """The format of one file, from its extension and first record; None when it is not recognised."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        first = next((cells for _, cells, _ in read_table(path, ",")), None) or []
        header = [cell.strip() for cell in first]
        if {"Question", "Options", "Answer"} <= set(header):
            return "cmexam"
        if header[:2] == ["id", "question"]:
            return "ceval"
        if {"Question", "A", "B"} <= set(header):
            return "cmmlu"
        return "mmlu" if len(header) == 6 and header[-1].upper() in ("A", "B", "C", "D") else None
    if extension not in (".json", ".jsonl"):
        return None
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{") and extension == ".json" and _is_pubmedqa(path):
        return "pubmedqa"
    with open(path, "rb") as f:
        first = next((value for _, value, _ in read_units(path, f) if isinstance(value, dict)), {})
    if "option" in first and "exam_type" in first:
        return "cmb"
    if "opa" in first:
        return "medmcqa"
    if "answer_idx" in first or ("options" in first and "meta_info" in first):
        return "medqa"
    return "jsonl"


def _is_pubmedqa(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return False
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    return isinstance(first, dict) and "QUESTION" in first


# -- CSV formats -------------------------------------------------------------------------------------------------


def _table(path):
    for line, cells, problem in read_table(path, ","):
        yield line, ([cell.strip() for cell in cells] if cells else None), problem


def _lettered_csv(path, question_key, answer_key, header=None):
    """CSV rows with the question, one column per option letter and the answer letter(s)."""
    rows = _table(path)
    if header is None:
        first = next(rows, None)
        if first is None or first[2]:
            yield (first[0], None, None, first[2]) if first else (0, None, None, "empty file")
            return
        header = first[1]
    if question_key not in header or "A" not in header:
        yield 1, None, None, f"expected the columns {question_key}, A, B, ... (got {', '.join(header)})"
        return
    letters = [cell for cell in header if len(cell) == 1 and cell in LETTERS]
    for line, cells, problem in rows:
        if problem:
            yield line, None, None, problem
            continue
        if len(cells) != len(header):
            yield line, None, None, f"expected {len(header)} cells ({', '.join(header)}), got {len(cells)}"
            continue
        record = dict(zip(header, cells))
        options = {letter: record[letter] for letter in letters}
        fields = {"question": record[question_key], "options": options, "answer": record.get(answer_key)}
        yield line, fields, record, None


def _ceval(path):
    return _lettered_csv(path, "question", "answer")


def _cmmlu(path):
    return _lettered_csv(path, "Question", "Answer")


def _mmlu(path):
    return _lettered_csv(path, "question", "answer", header=["question", "A", "B", "C", "D", "answer"])


def _cmexam(path):
    rows = _table(path)
    first = next(rows, None)
    if first is None or first[2]:
        yield (first[0], None, None, first[2]) if first else (0, None, None, "empty file")
        return
    header = first[1]
    missing = [key for key in ("Question", "Options", "Answer") if key not in header]
    if missing:
        yield 1, None, None, f"CMExam columns missing: {', '.join(missing)} (got {', '.join(header)})"
        return
    subject_key = next((key for key in CMEXAM_SUBJECT_COLUMNS if key in header), None)
    for line, cells, problem in rows:
        if problem or len(cells) != len(header):
            yield line, None, None, problem or f"expected {len(header)} cells, got {len(cells)}"
            continue
        record = dict(zip(header, cells))
        options = _option_lines(record["Options"])
        if options is None:
            yield line, None, None, 'Options: expected one option a line, "A 选项"'
            continue
        subject = record.get(subject_key) if subject_key else None
        yield (
            line,
            {"question": record["Question"], "options": options, "answer": record["Answer"], "subject": subject},
            record,
            None,
        )


def _option_lines(text):
    """ "A 头痛\\nB 发热" -> {"A": "头痛", "B": "发热"}; None if a line has no leading letter."""
    options = {}
    for line in filter(str.strip, text.splitlines()):
        match = _OPTION_LINE.match(line)
        if not match or not match.group(2):
            return None
        options[match.group(1).upper()] = match.group(2)
    return options


# -- JSON formats ------------------------------------------------------------------------------------------------


def _json_records(path):
    with open(path, "rb") as f:
        for line, value, problem in read_units(path, f):
            if problem or not isinstance(value, dict):
                yield line, None, problem or f"expected a JSON object, got {type(value).__name__}"
            else:
                yield line, value, None


def _cmb(path):
    for line, record, problem in _json_records(path):
        if problem:
            yield line, None, None, problem
            continue
        options = record.get("option")
        if isinstance(options, dict):  # CMB leaves unused letters empty ("E": "")
            options = {key: text for key, text in options.items() if not _blank(text)}
        fields = {
            "question": record.get("question"),
            "options": options,
            "answer": record.get("answer"),
            "subject": record.get("exam_subject"),
        }
        yield line, fields, record, None


def _medqa(path):
    for line, record, problem in _json_records(path):
        if problem:
            yield line, None, None, problem
            continue
        subject = record.get("meta_info") if isinstance(record.get("meta_info"), str) else None
        fields = {
            "question": record.get("question"),
            "options": record.get("options"),
            "answer": record.get("answer_idx"),
            "subject": subject,
        }
        yield line, fields, record, None


def _medmcqa(path):
    records = list(_json_records(path))
    cops = {record.get("cop") for _, record, problem in records if not problem}
    base, message = medmcqa_cop_base(cops)
    if message:
        (logger.warning if base is not None else lambda *a: None)("%s: %s", path, message)
    for line, record, problem in records:
        if problem or base is None:
            yield line, None, None, problem or message
            continue
        cop, answer = record.get("cop"), None
        if cop is not None and cop != -1 and (not isinstance(cop, int) or not 0 <= cop - base < 4):
            yield line, None, None, f"cop: {cop!r} is not an option number ({base}-{base + 3}: opa-opd)"
            continue
        if cop is not None and cop != -1:
            answer = LETTERS[cop - base]
        options = [record.get(key) for key in ("opa", "opb", "opc", "opd")]
        fields = {
            "question": record.get("question"),
            "options": options,
            "answer": answer,
            "subject": record.get("subject_name"),
        }
        yield line, fields, record, None


def medmcqa_cop_base(cops):
    """(1 or 0, message or None): 0 when a cop of 0 is seen (the hub's 0-3), 1 when a 4 is (the release's 1-4)."""
    if 0 in cops and 4 in cops:
        return None, "cop takes both 0 and 4: neither 1-4 (the original release) nor 0-3 (the hub)"
    if 0 in cops:
        return 0, None
    if 4 in cops or not cops & {1, 2, 3}:
        return 1, None
    return 1, "cop is only ever 1-3 here: read as 1-4 (the original release); the hub's files use 0-3"


def _pubmedqa(path):
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        yield e.lineno, None, None, f"invalid JSON: {e.msg} (column {e.colno})"
        return
    if not isinstance(data, dict):
        yield 1, None, None, "expected a JSON object {pubid: {QUESTION, CONTEXTS, final_decision}}"
        return
    position = 0
    for pubid, record in data.items():
        position = max(text.find(json.dumps(pubid), position), position)
        line = text.count("\n", 0, position) + 1
        if not isinstance(record, dict):
            yield line, None, None, f"{pubid}: expected an object"
            continue
        decision = record.get("final_decision")
        answer = {"yes": "A", "no": "B", "maybe": "C"}.get(decision)
        if decision is not None and answer is None:
            yield line, None, None, f"final_decision: expected yes, no or maybe, got {decision!r}"
            continue
        contexts = record.get("CONTEXTS")
        readable = isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)
        context = " ".join(contexts) if readable else ""
        question = record.get("QUESTION")
        if isinstance(question, str) and context:
            question = f"Abstract: {context}\nQuestion: {question}"
        fields = {"question": question, "options": {"A": "yes", "B": "no", "C": "maybe"}, "answer": answer}
        yield line, fields, {"pubid": pubid, **record}, None
