"""The evaluation files of `evaluate.py`, checked line by line, and the prompts of the multiple-choice task.

    choice  {"question": str, "options": {"A": str, "B": str, ...} or [str, ...] (lettered A, B, ...),
             "answer": "B" or "ACD" ("A,C,D", "A、C" and ["A", "C"] work too), "subject": str (optional)}
    qa      {"question": str, "answer": str (the reference answer), "subject": str (optional)}

`.jsonl` (one record per line) or `.json` (one array, or JSON lines). Other keys (an `id`, an explanation) are kept
and copied into the per-item output. Every problem is reported as `path:line: error: field: what is wrong`, all of
them, before any model is loaded.

A choice prompt is the question, its options one per line (`A. ...`) and a one-line instruction in the item's
language (Chinese when the question has Chinese characters); a multi-answer item says that more than one option may
be right. Few-shot examples are other items of the same file, same subject first, then in file order.
"""

import logging
import os
import re
import string

from medicalgpt.data.files import read_units
from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError, InputNotFoundError
from medicalgpt.eval.text_metrics import is_chinese

logger = logging.getLogger(__name__)
LETTERS = string.ascii_uppercase
ANSWER_SEPARATORS = re.compile(r"[\s,，、;；/|]+")


def load_eval_items(path, task, max_samples=None, skip_invalid=False):
    """Validate a choice or qa file -> items (dicts with "source": "path:line", "record": the line as read). Any
    error raises DataValidationError listing them all, unless skip_invalid: then bad records are skipped, counted
    and logged."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no such file")
    if not path.lower().endswith((".json", ".jsonl")):
        raise DataValidationError([Issue(path, 0, "error", "", "expected a .jsonl or .json file")])
    check = {"choice": _choice_item, "qa": _qa_item}[task]
    items, errors = [], []
    with open(path, "rb") as f:
        for line, value, problem in read_units(path, f):
            problems = [("", problem)] if problem else []
            item = None
            if not problems and not isinstance(value, dict):
                problems.append(("", f"expected a JSON object, got {type(value).__name__}"))
            elif not problems:
                item = check(value, problems)
            errors += [Issue(path, line, "error", where, message) for where, message in problems]
            if item is not None and not problems:
                items.append({**item, "source": f"{path}:{line}", "record": value})
    if errors and not skip_invalid:
        raise DataValidationError(errors)
    if errors:
        shown = "\n".join(str(error) for error in errors[:5])
        logger.warning("%s: skipped %d invalid records:\n%s", path, len({e.line for e in errors}), shown)
    if not items:
        raise DataValidationError([Issue(path, 0, "error", "", f"no {task} items in this file")])
    return items[:max_samples] if max_samples else items


def _text(record, key, problems, required=True):
    value = record.get(key)
    if value is None and not required:
        return None
    if value is None:
        problems.append((key, "missing"))
    elif not isinstance(value, str) or not value.strip():
        problems.append((key, "expected a non-empty string"))
    else:
        return value
    return None


def _qa_item(record, problems):
    question, answer = _text(record, "question", problems), _text(record, "answer", problems)
    subject = _text(record, "subject", problems, required=False)
    return {"question": question, "answer": answer, "subject": subject}


def _choice_item(record, problems):
    question = _text(record, "question", problems)
    subject = _text(record, "subject", problems, required=False)
    options = _options(record.get("options"), problems)
    answer = _answer(record.get("answer"), options, problems)
    return {"question": question, "options": options, "answer": answer, "subject": subject}


def _options(value, problems):
    """{"A": text, ...} or [text, ...] -> {letter: text} in letter order; None after a problem."""
    if isinstance(value, list):
        value = dict(zip(LETTERS, value)) if len(value) <= len(LETTERS) else None
    if not isinstance(value, dict) or len(value) < 2:
        problems.append(("options", 'expected an object {"A": text, "B": text, ...} or a list of 2 to 26 texts'))
        return None
    options, count = {}, len(problems)
    for key, text in value.items():
        letter = key.strip().upper() if isinstance(key, str) else ""
        if len(letter) != 1 or letter not in LETTERS or letter in options:
            problems.append(("options", f"option keys must be distinct letters A-Z, got {key!r}"))
        elif not isinstance(text, str) or not text.strip():
            problems.append((f"options.{key}", "expected a non-empty string"))
        else:
            options[letter] = text
    return dict(sorted(options.items())) if len(problems) == count else None


def _answer(value, options, problems):
    """ "B", "ACD", "A,C", ["A", "C"] -> "ACD" (sorted letters, each an option); None after a problem."""
    if isinstance(value, list) and all(isinstance(letter, str) for letter in value):
        value = "".join(value)
    if not isinstance(value, str) or not ANSWER_SEPARATORS.sub("", value):
        problems.append(("answer", 'expected the letter(s) of the correct option(s), e.g. "B" or "ACD"'))
        return None
    letters = ANSWER_SEPARATORS.sub("", value).upper()
    if len(set(letters)) != len(letters):
        problems.append(("answer", f"a letter appears twice in {value!r}"))
    elif options is not None and not set(letters) <= set(options):
        unknown = ", ".join(sorted(set(letters) - set(options)))
        problems.append(("answer", f"{unknown} is not one of the options ({', '.join(options)})"))
    else:
        return "".join(sorted(letters))
    return None


# -- prompts ---------------------------------------------------------------------------------------------------


def choice_instruction(item):
    """The line before a question: its kind (single or multiple answers) and subject, in the item's language."""
    multi, subject = len(item["answer"]) > 1, item.get("subject_name") or item["subject"]
    if is_chinese(item["question"]):
        about = f"关于{subject}的" if subject else ""
        if multi:
            return f"以下是一道{about}多项选择题（不止一个正确答案），请直接给出所有正确答案的选项字母。"
        return f"以下是一道{about}单项选择题，请直接给出正确答案的选项字母。"
    about = f" about {subject}" if subject else ""
    if multi:
        return f"The following is a multiple choice question{about} with more than one correct answer. " + (
            "Answer with the letters of all correct options."
        )
    return f"The following is a multiple choice question{about}. Answer with the letter of the correct option."


def choice_question(item):
    """The question and its options, one per line."""
    return "\n".join([item["question"], *(f"{letter}. {text}" for letter, text in item["options"].items())])


def choice_message(item):
    """The user message of a chat-format choice prompt (instruction, question, options)."""
    return f"{choice_instruction(item)}\n\n{choice_question(item)}"


def answer_cue(item):
    """What precedes the answer letters in a plain-format prompt, and what separates them from it."""
    return ("答案：", "") if is_chinese(item["question"]) else ("Answer:", " ")


def answer_text(item, target="letter"):
    """What answers an item: its letters, or (target "option", single-answer items) the text of its option."""
    return item["options"][item["answer"]] if target == "option" else item["answer"]


def choice_conversation(item, shots, target="letter"):
    """Chat format: each shot a user turn and the assistant's answer, then the item's user turn."""
    messages = []
    for shot in shots:
        messages += [
            {"role": "user", "content": choice_message(shot)},
            {"role": "assistant", "content": answer_text(shot, target)},
        ]
    return messages + [{"role": "user", "content": choice_message(item)}]


def choice_text(item, shots, target="letter"):
    """Plain format (base models): the instruction once, the shots with their answers, the item up to its cue."""
    blocks = [choice_instruction(item)]
    for shot in shots:
        cue, space = answer_cue(shot)
        blocks.append(f"{choice_question(shot)}\n{cue}{space}{answer_text(shot, target)}")
    blocks.append(f"{choice_question(item)}\n{answer_cue(item)[0]}")
    return "\n\n".join(blocks)


def pick_shots(items, index, n_shot, pool=None):
    """`n_shot` solved examples: from `pool` (a benchmark's dev split) when given, else the other items of the
    file; those of the same subject first, then the rest, each in file order."""
    if n_shot <= 0:
        return []
    subject = items[index]["subject"]
    others = pool if pool is not None else [item for i, item in enumerate(items) if i != index]
    same = [item for item in others if subject is not None and item["subject"] == subject]
    rest = [item for item in others if subject is None or item["subject"] != subject]
    return (same + rest)[:n_shot]


def choice_sft_records(items):
    """Choice items as SFT records (supervised_finetuning.py's `messages` shape): the chat-format prompt of
    evaluate.py as the user turn, the answer letters as the assistant's: training on a benchmark's dev split
    teaches exactly what `--task choice` scores."""
    return [
        {
            "messages": [
                {"role": "user", "content": choice_message(item)},
                {"role": "assistant", "content": item["answer"]},
            ]
        }
        for item in items
    ]
