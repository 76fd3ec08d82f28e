"""Find, validate and normalise the training data of every stage: the one validator that `validate_jsonl.py` and
every training script use.

Problems are reported compiler-style (`path:line: error: field: what is wrong`), all of them, never stopping at the
first; a bad record is never dropped silently. Normalised records, one shape per stage, with "source": "path:line":
    pt          {"text": str}
    sft         {"messages": [{"role": str, "content": str}, ...], "system": str | None, "tools": str | None}
    preference  the sft shape, its messages ending with a user-side turn, plus "chosen": str and "rejected": str
Roles: user, assistant, function_call (assistant side: a tool call), observation (user side: a tool result).
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field

from medicalgpt.data.files import find_data_files, read_units

logger = logging.getLogger(__name__)

STAGES = ("pt", "sft", "preference")
MAX_SHOWN = 20  # issues printed in full; the rest are counted
USER_SIDE = ("user", "observation")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "function_call", "observation": "observation", "tool": "observation",
}  # fmt: skip
MESSAGE_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "observation",
    "function_call": "function_call",
}  # fmt: skip
SHAPES = {  # what each stage accepts, for "unknown shape" errors
    "pt": "record has none of the pt fields: expected 'text'",
    "sft": "record has none of the SFT fields: expected 'conversations', 'messages' or 'instruction'+'output'",
    "preference": "record has none of the preference fields: expected 'chosen'+'rejected' with 'prompt' or "
    "'conversations', or 'question'+'response_chosen'+'response_rejected'",
    None: "record has none of the known fields: expected 'text' (pt), 'conversations', 'messages' or "
    "'instruction'+'output' (sft), or 'chosen'+'rejected' (preference)",
}
STAGE_KEYS = {
    "pt": "'text'",
    "sft": "'conversations', 'messages' or 'instruction'",
    "preference": "'chosen'/'rejected'",
}


@dataclass
class Issue:
    """One problem; line 0 means the whole file."""

    path: str
    line: int
    severity: str  # "error" | "warning"
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {self.severity}: {what}"


class DataValidationError(ValueError):
    """Invalid records: `.errors` holds every Issue; the message shows the first MAX_SHOWN."""

    def __init__(self, errors: list[Issue]):
        self.errors = list(errors)
        lines = [str(error) for error in self.errors[:MAX_SHOWN]]
        if len(self.errors) > MAX_SHOWN:
            lines.append(f"... and {len(self.errors) - MAX_SHOWN} more errors")
        lines.append("Fix these records, or pass --skip_invalid_examples to skip them.")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickles (for multiprocessing) from the issues, not from the message
        return self.__class__, (self.errors,)


@dataclass
class FileReport:
    path: str
    records: list[dict] = field(default_factory=list)  # normalised valid records, in file order
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    kinds: collections.Counter = field(default_factory=collections.Counter)  # valid records per detected format
    turns: int = 0  # messages in valid records (for preference: context messages + the response)


@dataclass
class _Turn:
    role: str  # normalised role
    content: str
    where: str  # e.g. "conversations[2]"
    content_field: str  # e.g. "conversations[2].value"
    label: str  # the role as written, e.g. "gpt"


class _Checker:
    """Collects one record's problems as (severity, field, message)."""

    def __init__(self):
        self.items, self.errors = [], 0

    def error(self, where: str, message: str) -> None:
        self.items.append(("error", where, message))
        self.errors += 1

    def warning(self, where: str, message: str) -> None:
        self.items.append(("warning", where, message))


def _check_stage(stage: str | None, optional: bool = False) -> None:
    if stage not in STAGES and not (optional and stage is None):
        raise ValueError(f"unknown stage {stage!r} (expected one of: {', '.join(STAGES)})")


def _kind(value) -> str:
    names = {type(None): "null", bool: "bool", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _string(obj: dict, key: str, where: str, ck: _Checker, required: bool = True) -> str | None:
    if obj.get(key) is None and (key not in obj or not required):
        if required:
            ck.error(where, "missing")
        return None
    if not isinstance(obj[key], str):
        ck.error(where, f"expected a string, got {_kind(obj[key])}")
        return None
    return obj[key]


def detect_stage(record: dict) -> str | None:
    if not isinstance(record, dict):
        return None
    if any(key in record for key in ("chosen", "rejected", "response_chosen", "response_rejected")):
        return "preference"
    if any(key in record for key in ("conversations", "messages", "instruction")):
        return "sft"
    return "pt" if "text" in record else None


def _read_turns(items, where: str, ck: _Checker, roles: dict, role_key: str, content_key: str):
    """A sharegpt (from/value) or OpenAI (role/content) message list -> (turns, leading system message)."""
    if not isinstance(items, list) or not items:
        ck.error(
            where, f"expected a non-empty list of messages, got {'an empty list' if items == [] else _kind(items)}"
        )
        return [], None
    errors, turns, system = ck.errors, [], None
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            ck.error(at, f"expected an object with '{role_key}' and '{content_key}', got {_kind(item)}")
            continue
        label = item.get(role_key)
        role = roles.get(label) if isinstance(label, str) else None
        if role is None:
            problem = "missing" if label is None else f"unknown role {label!r} (expected one of: {', '.join(roles)})"
            ck.error(f"{at}.{role_key}", problem)
        elif item.get("tool_calls") and role == "assistant":
            turns.append(_Turn("function_call", _tool_call(item, at, ck), at, f"{at}.tool_calls", "tool_calls"))
        elif role == "system" and i > 0:
            ck.error(f"{at}.{role_key}", "a system message is only allowed first")
        else:
            content = _string(item, content_key, f"{at}.{content_key}", ck)
            if role == "system":
                system = content
            else:
                turns.append(_Turn(role, content, at, f"{at}.{content_key}", label))
    return (turns if ck.errors == errors else None), system


def _tool_call(message: dict, at: str, ck: _Checker) -> str | None:
    """An OpenAI assistant message with tool_calls -> function_call content {"name": ..., "arguments": ...}."""
    calls = message["tool_calls"]
    if not isinstance(calls, list) or len(calls) > 1:
        got = f"{len(calls)} calls" if isinstance(calls, list) else _kind(calls)
        ck.error(f"{at}.tool_calls", f"expected a list with one tool call (one call per message), got {got}")
        return None
    call = calls[0].get("function", calls[0]) if isinstance(calls[0], dict) else None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        ck.error(f"{at}.tool_calls[0]", "expected {'function': {'name': str, 'arguments': ...}}")
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            ck.error(f"{at}.tool_calls[0].function.arguments", f"not valid JSON: {e.msg} (column {e.colno})")
            return None
    if message.get("content"):
        ck.warning(f"{at}.content", "text beside tool_calls is not trained on (only the call is)")
    return json.dumps({"name": call["name"], "arguments": arguments}, ensure_ascii=False)


def _history(record: dict, ck: _Checker) -> list[_Turn] | None:
    """Alpaca-style `history`: [[question, answer], ...] -> turns."""
    history = record.get("history")
    if not history:
        return []
    if not isinstance(history, list):
        ck.error("history", f"expected a list of [question, answer] pairs, got {_kind(history)}")
        return None
    errors, turns = ck.errors, []
    for i, pair in enumerate(history):
        at = f"history[{i}]"
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair):
            turns.append(_Turn("user", pair[0], at, f"{at}[0]", "question"))
            turns.append(_Turn("assistant", pair[1], at, f"{at}[1]", "answer"))
        else:
            got = json.dumps(pair, ensure_ascii=False)[:80]
            ck.error(at, f"expected a [question, answer] pair of strings, got {got}")
    return turns if ck.errors == errors else None


def _check_order(turns: list[_Turn], ck: _Checker) -> None:
    """User-side and assistant-side turns must alternate, starting with the user side."""
    previous = None
    for turn in turns:
        side = "user" if turn.role in USER_SIDE else "assistant"
        if previous is None and side == "assistant":
            ck.error(turn.where, f"the conversation starts with an assistant-side turn ({turn.label})")
        elif previous is not None and side == ("user" if previous.role in USER_SIDE else "assistant"):
            ck.error(turn.where, f"two {side}-side turns in a row ({turn.label} after {previous.label})")
        elif turn.role == "observation" and previous is not None and previous.role != "function_call":
            ck.warning(turn.where, f"a tool result ({turn.label}) follows {previous.label}, not a function_call")
        previous = turn


def _messages(turns: list[_Turn], ck: _Checker) -> list[dict]:
    """The normalised messages, with a warning for each empty one."""
    for turn in turns:
        if not turn.content.strip():
            ck.warning(turn.content_field, f"empty {'user' if turn.role in USER_SIDE else 'assistant'} turn")
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def _system_and_tools(record: dict, inline: str | None, ck: _Checker) -> tuple[str | None, str | None]:
    """The top-level `system` (or the conversation's leading system message) and `tools` as a JSON string."""
    system = _string(record, "system", "system", ck, required=False)
    if system and inline and system != inline:
        ck.error("system", "differs from the conversation's own system message")
    tools = record.get("tools")
    if isinstance(tools, (list, dict)):
        tools = json.dumps(tools, ensure_ascii=False)
    elif tools is not None and not isinstance(tools, str):
        ck.error("tools", f"expected a JSON string, a list or an object, got {_kind(tools)}")
    elif tools:
        try:
            json.loads(tools)
        except json.JSONDecodeError as e:
            ck.error("tools", f"not valid JSON: {e.msg} (column {e.colno})")
    return (system if system is not None else inline), (tools or None)


def _sft(record: dict, ck: _Checker) -> tuple[dict | None, str]:
    system = None
    if "conversations" in record:
        kind, where = "sharegpt", "conversations"
        turns, system = _read_turns(record[where], where, ck, SHAREGPT_ROLES, "from", "value")
    elif "messages" in record:
        kind, where = "messages", "messages"
        turns, system = _read_turns(record[where], where, ck, MESSAGE_ROLES, "role", "content")
    else:
        kind, where, turns = "alpaca", "output", _history(record, ck)
        instruction = _string(record, "instruction", "instruction", ck)
        extra = _string(record, "input", "input", ck, required=False)
        output = _string(record, "output", "output", ck)
        if turns is not None and instruction is not None and output is not None:
            prompt = f"{instruction}\n{extra}" if extra else instruction
            turns += [_Turn("user", prompt, "instruction", "instruction", "instruction")]
            turns += [_Turn("assistant", output, "output", "output", "output")]
    system, tools = _system_and_tools(record, system, ck)
    if turns is None or ck.errors:
        return None, kind
    _check_order(turns, ck)
    if ck.errors:
        return None, kind
    if not any(turn.content.strip() for turn in turns if turn.role not in USER_SIDE):
        ck.error(where, "no assistant content to learn from")
        return None, kind
    if turns[-1].role in USER_SIDE:
        ck.warning(
            turns[-1].where, f"the conversation ends with a user turn ({turns[-1].label}); it is not trained on"
        )
        turns = turns[:-1]
    return {"messages": _messages(turns, ck), "system": system, "tools": tools}, kind


def _response(record: dict, key: str, ck: _Checker) -> str | None:
    """`chosen`/`rejected`: a string, or (conversational) a list holding one assistant message."""
    value = record.get(key)
    message = value[0] if isinstance(value, list) and len(value) == 1 else None
    if isinstance(message, dict) and message.get("role") == "assistant":
        where, text = f"{key}[0].content", _string(message, "content", f"{key}[0].content", ck)
    elif value is None or isinstance(value, str):
        where, text = key, _string(record, key, key, ck)
    else:
        ck.error(key, f"expected a string or a list with one assistant message, got {_kind(value)}")
        return None
    if text is not None and not text.strip():
        ck.error(where, "empty")
    return text


def _text_prompt(record: dict, where: str, ck: _Checker) -> list[_Turn] | None:
    """A string prompt (`prompt` or `question`) after an optional alpaca-style `history`."""
    turns, text = _history(record, ck), _string(record, where, where, ck)
    return None if turns is None or text is None else [*turns, _Turn("user", text, where, where, where)]


def _preference(record: dict, ck: _Checker) -> tuple[dict | None, str]:
    keys, system, prompt = ("chosen", "rejected"), None, record.get("prompt")
    if any(key in record for key in ("question", "response_chosen", "response_rejected")):
        kind, where, keys = "question_response_chosen_rejected", "question", ("response_chosen", "response_rejected")
        turns = _text_prompt(record, where, ck)
    elif "conversations" in record:
        kind, where = "sharegpt_chosen_rejected", "conversations"
        turns, system = _read_turns(record[where], where, ck, SHAREGPT_ROLES, "from", "value")
    elif isinstance(prompt, list):
        kind, where = "messages_chosen_rejected", "prompt"
        turns, system = _read_turns(prompt, where, ck, MESSAGE_ROLES, "role", "content")
    elif "prompt" in record:
        kind, where, turns = "prompt_chosen_rejected", "prompt", _text_prompt(record, "prompt", ck)
    else:
        ck.error("", f"{SHAPES['preference']} (got keys: {', '.join(map(str, record))})")
        return None, ""
    chosen, rejected = (_response(record, key, ck) for key in keys)
    system, tools = _system_and_tools(record, system, ck)
    if turns is None or ck.errors:
        return None, kind
    _check_order(turns, ck)
    if not turns:
        ck.error(where, "the context has no user turn")
    elif turns[-1].role not in USER_SIDE:
        ending = turns[-1].label
        ck.error(where, f"the context must end with a user turn, not {ending} (the response goes in {keys[0]})")
    if ck.errors:
        return None, kind
    if chosen == rejected:
        ck.warning(keys[1], f"same text as {keys[0]}; the pair teaches nothing")
    messages = _messages(turns, ck)
    return {"messages": messages, "system": system, "tools": tools, "chosen": chosen, "rejected": rejected}, kind


def _pt(record: dict, ck: _Checker) -> tuple[dict | None, str]:
    text = _string(record, "text", "text", ck)
    if text is not None and not text.strip():
        ck.warning("text", "empty; the record is left out")
        return None, "text"
    return ({"text": text} if text is not None else None), "text"


_VALIDATORS = {"pt": _pt, "sft": _sft, "preference": _preference}


def _validate_record(value, stage: str | None, ck: _Checker) -> tuple[dict | None, str]:
    if not isinstance(value, dict):
        ck.error("", f"expected a JSON object, got {_kind(value)}")
        return None, ""
    found = detect_stage(value)
    if found is None:
        ck.error("", f"{SHAPES[stage]} (got keys: {', '.join(map(str, value)) or 'none'})")
        return None, ""
    if stage is not None and found != stage:
        ck.error("", f"this looks like a {found} record (it has {STAGE_KEYS[found]}), but the stage is {stage}")
        return None, ""
    return _VALIDATORS[found](value, ck)


def _check_units(report: FileReport, units, stage: str | None) -> FileReport:
    """Validate (line, value, problem) units into `report`."""
    seen = 0
    for line, value, problem in units:
        seen, ck = seen + 1, _Checker()
        if problem:
            ck.error("", problem)
            record = None
        else:
            record, kind = _validate_record(value, stage, ck)
        for severity, where, message in ck.items:
            issues = report.errors if severity == "error" else report.warnings
            issues.append(Issue(report.path, line, severity, where, message))
        if record is not None and not ck.errors:
            record["source"] = f"{report.path}:{line}"
            report.records.append(record)
            report.kinds[kind] += 1
            report.turns += len(record.get("messages", ())) + ("chosen" in record)
    if not seen:
        report.warnings.append(Issue(report.path, 0, "warning", "", "no records in this file"))
    return report


def validate_units(path: str, units, stage: str | None = None) -> FileReport:
    """Validate and normalise (line, value, problem) units read from `path` (see medicalgpt.data.files), e.g. table
    rows mapped to records; stage None infers each record's stage."""
    _check_stage(stage, optional=True)
    return _check_units(FileReport(path), units, stage)


def validate_file(path: str, stage: str | None = None) -> FileReport:
    """Validate and normalise one file; stage None infers each record's stage (a .txt file is pt)."""
    _check_stage(stage, optional=True)
    report = FileReport(path)
    if path.lower().endswith(".txt"):
        if stage not in (None, "pt"):
            report.errors.append(Issue(path, 0, "error", "", f"a .txt file holds pt text, not {stage} data"))
            return report
        stage = "pt"
    try:
        with open(path, "rb") as f:
            return _check_units(report, read_units(path, f), stage)
    except OSError as e:
        report.errors.append(Issue(path, 0, "error", "", f"cannot read the file: {e.strerror or e}"))
        return report


def normalize_rows(rows, stage: str, name: str, skip_invalid: bool = False) -> list[dict]:
    """Validate and normalise in-memory rows (e.g. a hub dataset split), reported as `name:row`, counted from 1.
    Keys whose value is None are ignored: `datasets` fills them in for columns a row does not have."""
    _check_stage(stage)
    units = (
        (i, {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row, None)
        for i, row in enumerate(rows, 1)
    )
    return _collect([_check_units(FileReport(name), units, stage)], skip_invalid)


def _log_issues(title: str, issues: list[Issue], shown: int = MAX_SHOWN) -> None:
    lines = [str(issue) for issue in issues[:shown]]
    if len(issues) > shown:
        lines.append(f"... and {len(issues) - shown} more")
    logger.warning("%s:\n%s", title, "\n".join(lines))


def _collect(reports: list[FileReport], skip_invalid: bool) -> list[dict]:
    warnings = [issue for report in reports for issue in report.warnings]
    if warnings:
        _log_issues(f"{len(warnings)} data warnings", warnings)
    errors = [issue for report in reports for issue in report.errors]
    if errors and not skip_invalid:
        raise DataValidationError(errors)
    for report in (report for report in reports if report.errors):
        skipped = len({issue.line for issue in report.errors})
        _log_issues(f"{report.path}: skipped {skipped} invalid records (--skip_invalid_examples)", report.errors, 5)
    return [record for report in reports for record in report.records]


def load_records(paths: list[str], stage: str, skip_invalid: bool = False) -> list[dict]:
    """Validate every file (directories are searched) and return the normalised records of all, in order.
    Any error raises DataValidationError listing them all, unless skip_invalid: then bad records are skipped,
    counted and logged. Warnings are logged."""
    _check_stage(stage)
    files = find_data_files(paths, stage)
    records = _collect([validate_file(path, stage) for path in files], skip_invalid)
    if not records:
        raise DataValidationError([Issue(path, 0, "error", "", "no usable records") for path in files])
    return records
