"""Read the prompts of batch inference (`inference.py --data_file`), checked line by line like training data.

    .txt     one prompt per line (blank lines skipped)
    .jsonl   one record per line, the first of these fields that is present:
             prompt | instruction (+ input) | question      a single user turn (alpaca `history` pairs before it)
             messages (role/content) | conversations (from/value)   a conversation; trailing assistant turns are
                                                                     dropped, so an SFT file asks its own questions
             an optional `system` (or a leading system message) sets the system prompt.

Every problem is reported as `path:line: error: field: what is wrong`, all of them, before any model is loaded.
"""

import json

from medicalgpt.data.validate import MESSAGE_ROLES, SHAREGPT_ROLES, Issue
from medicalgpt.errors import DataValidationError

PROMPT_FIELDS = ("prompt", "instruction", "question", "messages", "conversations")
USER_SIDE = ("user", "observation")


def load_prompt_records(path):
    """-> [(line, record, messages)]: where it was read, the record (for the output) and the conversation to answer."""
    items, errors = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
            except UnicodeDecodeError as error:
                errors.append(Issue(path, number, "error", "", f"not valid UTF-8 at byte offset {error.start}"))
                continue
            if not line.strip():
                continue
            if path.lower().endswith(".txt"):
                items.append((number, {"prompt": line}, [{"role": "user", "content": line}]))
                continue
            record, messages, problem = _parse_line(line)
            if problem:
                errors.append(Issue(path, number, "error", problem[0], problem[1]))
            else:
                items.append((number, record, messages))
    if errors:
        raise DataValidationError(errors)
    if not items:
        raise DataValidationError([Issue(path, 0, "error", "", "no prompts in this file")])
    return items


def _parse_line(line):
    """-> (record, messages, None) or (None, None, (field, message))."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, None, ("", f"invalid JSON: {error.msg} (column {error.colno})")
    if not isinstance(record, dict):
        return None, None, ("", f"expected a JSON object, got {type(record).__name__}")
    key = next((key for key in PROMPT_FIELDS if key in record), None)
    if key is None:
        keys = ", ".join(map(str, record)) or "none"
        return None, None, ("", f"record has no prompt: expected one of {', '.join(PROMPT_FIELDS)} (got keys: {keys})")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        return None, None, ("system", "expected a string")
    if key in ("messages", "conversations"):
        messages, problem = _conversation(record[key], key)
    else:
        messages, problem = _single_turn(record, key)
    if problem:
        return None, None, problem
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return record, messages, None


def _single_turn(record, key):
    text = record[key]
    if not isinstance(text, str) or not text.strip():
        return None, (key, "expected a non-empty string")
    extra = record.get("input") if key == "instruction" else None
    if extra is not None and not isinstance(extra, str):
        return None, ("input", "expected a string")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(_is_pair(pair) for pair in history):
        return None, ("history", "expected a list of [question, answer] pairs of strings")
    messages = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
    return [*messages, {"role": "user", "content": f"{text}\n{extra}" if extra else text}], None


def _is_pair(pair):
    return isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)


def _conversation(items, key):
    """A messages / conversations list -> role messages ending with a user turn."""
    roles, role_key, content_key = (
        (MESSAGE_ROLES, "role", "content") if key == "messages" else (SHAREGPT_ROLES, "from", "value")
    )
    if not isinstance(items, list) or not items:
        return None, (key, "expected a non-empty list of messages")
    messages = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            return None, (where, f"expected an object with '{role_key}' and '{content_key}'")
        role = roles.get(item.get(role_key)) if isinstance(item.get(role_key), str) else None
        if role is None:
            known = ", ".join(roles)
            return None, (f"{where}.{role_key}", f"unknown role {item.get(role_key)!r} (expected one of: {known})")
        if not isinstance(item.get(content_key), str):
            return None, (f"{where}.{content_key}", "expected a string")
        if role == "system" and index > 0:
            return None, (f"{where}.{role_key}", "a system message is only allowed first")
        messages.append({"role": role, "content": item[content_key]})
    while messages and messages[-1]["role"] not in (*USER_SIDE, "system"):
        messages.pop()  # the reference answer of an SFT record: the model answers the question itself
    if not messages or messages[-1]["role"] not in USER_SIDE:
        return None, (key, "no user message to answer")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        if (message["role"] in USER_SIDE) != (index % 2 == 0):
            return None, (key, "user-side and assistant-side messages must alternate, starting with the user")
    return messages, None
