"""A benchmark as one set of choice items: a file, a folder of per-subject files, or a name on the hub.

    items, shots = load_benchmark("ceval-exam", subjects="medical")   # val/ scored, dev/ for few-shot
    items, shots = load_benchmark("data/eval/medmcqa_dev.jsonl")      # the format is detected

Folders laid out as C-Eval, CMMLU and MMLU ship (dev/, val/, test/ with one CSV per subject) are scored on one split
(`split`: C-Eval val, CMMLU test, MMLU test by default) and draw few-shot examples from dev/; each file is a subject
(its name without `_val` / `_dev` / `_test`). A folder without split subfolders is read whole. The built-in medical
subjects (`subjects="medical"`) are listed in MEDICAL_SUBJECTS; C-Eval's and CMMLU's come with their Chinese names,
which the prompts use. A hub name (ceval/ceval-exam, haonan-li/cmmlu, cais/mmlu, openlifescienceai/medmcqa,
GBaker/MedQA-USMLE-4-options) loads through `datasets` when the hub is reachable.
"""

import glob
import logging
import os

from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError, InputNotFoundError, UsageError
from medicalgpt.eval.formats import FORMATS, check_rows, detect_format, read_rows
from medicalgpt.eval.items import load_eval_items

logger = logging.getLogger(__name__)
PER_SUBJECT = ("ceval", "cmmlu", "mmlu")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}
SPLITS = ("dev", "val", "test")
MEDICAL_SUBJECTS = {
    "ceval": {"clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格"},
    "cmmlu": {"anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medical_statistics": "大学医学统计",
              "college_medicine": "大学医学", "genetics": "遗传学", "nutrition": "营养学",
              "professional_medicine": "专业医学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学"},
    "mmlu": {"anatomy": None, "clinical_knowledge": None, "college_biology": None, "college_medicine": None,
             "medical_genetics": None, "professional_medicine": None},
}  # fmt: skip
HUB = {
    "ceval/ceval-exam": "ceval",
    "haonan-li/cmmlu": "cmmlu",
    "cais/mmlu": "mmlu",
    "openlifescienceai/medmcqa": "medmcqa",
    "GBaker/MedQA-USMLE-4-options": "medqa",
}
EXTENSIONS = (".csv", ".json", ".jsonl")


def load_benchmark(path, fmt="auto", split=None, subjects=None, max_samples=None, skip_invalid=False):
    """(items to score, solved items for few-shot or None) -> every file checked before any model loads."""
    if fmt not in ("auto", *FORMATS):
        raise UsageError(f"--format {fmt}: expected auto or one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        if path in HUB or (path.count("/") == 1 and not path.startswith((".", "/"))):
            return load_hub_benchmark(path, fmt, split, subjects, max_samples)
        raise InputNotFoundError(f"{path}: no such file or directory")
    files, shot_files, fmt = _benchmark_files(path, fmt, split)
    wanted = wanted_subjects(fmt, subjects)
    items = _read(files, fmt, wanted, skip_invalid)
    shots = _read(shot_files, fmt, wanted, skip_invalid) if shot_files else None
    missing = sorted(set(wanted or ()) - {item["subject"] for item in items})
    if missing and subjects == "medical":
        logger.warning("%s: no files of the medical subjects %s", path, ", ".join(missing))
    elif missing:
        raise UsageError(f"--subjects: {path} has no items of {', '.join(missing)}")
    if not items:
        raise DataValidationError([Issue(path, 0, "error", "", "no choice items here")])
    return items[:max_samples] if max_samples else items, shots


def _benchmark_files(path, fmt, split):
    """(files to score, files for shots, format)."""
    if os.path.isfile(path):
        fmt = fmt if fmt != "auto" else detect_format(path)
        if fmt is None:
            raise UsageError(f"{path}: not a benchmark file this tool knows; name its --format ({', '.join(FORMATS)})")
        return [path], [], fmt
    layout = [name for name in SPLITS if os.path.isdir(os.path.join(path, name))]
    found = _files_in(path)
    if not found:
        raise InputNotFoundError(f"{path}: no {' '.join(EXTENSIONS)} files in this directory or below")
    fmt = fmt if fmt != "auto" else detect_format(found[0])
    if fmt is None:
        raise UsageError(f"{path}: the files are not a benchmark this tool knows; name its --format")
    if not layout:
        return found, [], fmt
    split = split or DEFAULT_SPLIT.get(fmt) or ("val" if "val" in layout else layout[-1])
    if split not in layout:
        raise UsageError(f"{path}: no {split}/ folder (found: {', '.join(layout)}); choose --split")
    shots = _files_in(os.path.join(path, "dev")) if split != "dev" and "dev" in layout else []
    return _files_in(os.path.join(path, split)), shots, fmt


def _files_in(folder):
    pattern = os.path.join(glob.escape(folder), "**", "*")
    found = glob.glob(pattern, recursive=True)
    return sorted(f for f in found if f.lower().endswith(EXTENSIONS) and os.path.isfile(f))


def subject_of_file(path):
    """ "val/clinical_medicine_val.csv" -> "clinical_medicine"."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for split in SPLITS:
        stem = stem.removesuffix(f"_{split}")
    return stem


def wanted_subjects(fmt, subjects):
    """None (all), or the subject names asked for: "medical" (the built-in list) or "a,b,c"."""
    if not subjects:
        return None
    if subjects == "medical":
        if fmt not in MEDICAL_SUBJECTS:
            raise UsageError(f"--subjects medical: only for {', '.join(MEDICAL_SUBJECTS)}; {fmt} is all medical")
        return list(MEDICAL_SUBJECTS[fmt])
    return [name.strip() for name in subjects.split(",") if name.strip()]


def _read(files, fmt, wanted, skip_invalid):
    items, issues = [], []
    for path in files:
        subject = subject_of_file(path) if fmt in PER_SUBJECT else None
        if subject is not None and wanted is not None and subject not in wanted:
            continue
        if fmt == "jsonl":
            try:
                found = load_eval_items(path, "choice", skip_invalid=skip_invalid)
            except DataValidationError as error:
                issues += error.errors
                continue
        else:
            rows, issues_read = read_rows(path, fmt)
            found, issues_checked = check_rows(path, fmt, rows, subject)
            issues += issues_read + issues_checked
        items += [item for item in found if wanted is None or item["subject"] in wanted]
    if issues and not skip_invalid:
        raise DataValidationError(issues)
    if issues:
        shown = "\n".join(str(issue) for issue in issues[:5])
        logger.warning("Skipped %d invalid records:\n%s", len({(i.path, i.line) for i in issues}), shown)
    return [_named(item, fmt) for item in items]


def _named(item, fmt):
    """The subject's name in the benchmark's language, for the prompt (subject_name)."""
    name = MEDICAL_SUBJECTS.get(fmt, {}).get(item["subject"])
    if name is None and item["subject"] and fmt in PER_SUBJECT:
        name = item["subject"].replace("_", " ")
    return {**item, "subject_name": name} if name else item


# -- the hub -----------------------------------------------------------------------------------------------------


def load_hub_benchmark(name, fmt, split, subjects, max_samples=None):
    """A benchmark from the Hugging Face hub through `datasets` (per-subject configs for C-Eval, CMMLU, MMLU)."""
    import datasets

    fmt = HUB.get(name, fmt)
    if fmt in ("auto", "jsonl"):
        raise UsageError(
            f"{name}: no such file or directory, nor a hub benchmark this tool knows ({', '.join(HUB)}; "
            "others: name their --format)"
        )
    wanted = wanted_subjects(fmt, subjects)
    if fmt in PER_SUBJECT and wanted is None:
        raise UsageError(f"{name} has one configuration per subject: name them (--subjects medical or a,b,c)")
    split = split or {"ceval": "val", "cmmlu": "test", "mmlu": "test", "medmcqa": "validation"}.get(fmt, "test")
    items, shots = [], []
    for config in wanted if fmt in PER_SUBJECT else [None]:
        try:
            data = datasets.load_dataset(name, config)
        except Exception as error:  # offline, unknown name, no such config: one line for the user
            message = f"{name}: no such file or directory, and not loadable from the hub"
            raise UsageError(f"{message} ({type(error).__name__}: {error})") from error
        if split not in data:
            raise UsageError(f"{name}: no split {split!r} (found: {', '.join(data)})")
        items += _hub_items(name, fmt, data[split], config, split)
        shots += _hub_items(name, fmt, data["dev"], config, "dev") if "dev" in data and split != "dev" else []
    if wanted is not None and fmt not in PER_SUBJECT:
        items = [item for item in items if item["subject"] in wanted]
    return items[:max_samples] if max_samples else items, shots or None


def _hub_items(name, fmt, rows, subject, split):
    source = f"{name}/{subject}/{split}" if subject else f"{name}/{split}"
    fields = [(index + 1, hub_fields(fmt, row), row) for index, row in enumerate(rows)]
    items, issues = check_rows(source, fmt, fields, subject)
    if issues:
        raise DataValidationError(issues)
    return [_named(item, fmt) for item in items]


def hub_fields(fmt, row):
    """One hub row -> {question, options, answer, subject}; the hub's columns differ from the released files'."""
    if fmt == "mmlu":  # cais/mmlu: choices [..], answer 0-3
        answer = row.get("answer")
        return {
            "question": row.get("question"),
            "options": row.get("choices"),
            "answer": "ABCD"[answer] if isinstance(answer, int) and 0 <= answer < 4 else None,
        }
    if fmt == "medmcqa":  # the hub's cop is 0-3, -1 in the test split
        cop = row.get("cop")
        return {
            "question": row.get("question"),
            "options": [row.get(k) for k in ("opa", "opb", "opc", "opd")],
            "answer": "ABCD"[cop] if isinstance(cop, int) and 0 <= cop < 4 else None,
            "subject": row.get("subject_name"),
        }
    if fmt == "medqa":
        return {
            "question": row.get("question"),
            "options": row.get("options"),
            "answer": row.get("answer_idx"),
            "subject": row.get("meta_info"),
        }
    question, answer = ("question", "answer") if fmt == "ceval" else ("Question", "Answer")
    options = {letter: row[letter] for letter in "ABCD" if letter in row}
    return {"question": row.get(question), "options": options, "answer": row.get(answer)}
