"""The shapes of training records: one record checked and normalised to its stage's shape.

Normalised records, one shape per stage (the loaders in medicalgpt.data.validate add "source": "path:line"):
    pt          {"text": str}
    sft         {"messages": [{"role": str, "content": str}, ...], "system": str | None, "tools": str | None}
    preference  the sft shape, its messages ending with a user-side turn, plus "chosen": str and "rejected": str
    kto         the preference context plus "completion": str, "label": bool, "rejected": str | None
                (medicalgpt.data.unpaired: unpaired answers with a label, and preference pairs split in two)
Roles: user, assistant, function_call (assistant side: a tool call), observation (user side: a tool result).
Problems are collected by a Checker as (severity, field, message); the caller says where (path:line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

STAGES = ("pt", "sft", "preference", "kto")
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
    "kto": "record has none of the KTO fields: expected 'label' with 'prompt'+'completion', 'conversations', "
    "'messages' or 'instruction'+'output', or a preference pair ('chosen'+'rejected')",
    None: "record has none of the known fields: expected 'text' (pt), 'conversations', 'messages' or "
    "'instruction'+'output' (sft), 'chosen'+'rejected' (preference), or one of those with 'label' (kto)",
}
UNPAIRED_KEYS = ("completion", "conversations", "messages", "instruction", "prompt")  # with "label": a KTO record
STAGE_KEYS = {
    "pt": "'text'",
    "sft": "'conversations', 'messages' or 'instruction'",
    "preference": "'chosen'/'rejected'",
    "kto": "'label'",
}


@dataclass
class _Turn:
    role: str  # normalised role
    content: str
    where: str  # e.g. "conversations[2]"
    content_field: str  # e.g. "conversations[2].value"
    label: str  # the role as written, e.g. "gpt"


class Checker:
    """Collects one record's problems as (severity, field, message)."""

    def __init__(self):
        self.items, self.errors = [], 0

    def error(self, where: str, message: str) -> None:
        self.items.append(("error", where, message))
        self.errors += 1

    def warning(self, where: str, message: str) -> None:
        self.items.append(("warning", where, message))


def check_stage(stage: str | None, optional: bool = False) -> None:
    if stage not in STAGES and not (optional and stage is None):
        raise ValueError(f"unknown stage {stage!r} (expected one of: {', '.join(STAGES)})")


def _kind(value) -> str:
    names = {type(None): "null", bool: "bool", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _string(obj: dict, key: str, where: str, ck: Checker, required: bool = True) -> str | None:
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
    if "label" in record and any(key in record for key in UNPAIRED_KEYS):
        return "kto"
    if any(key in record for key in ("chosen", "rejected", "response_chosen", "response_rejected")):
        return "preference"
    if any(key in record for key in ("conversations", "messages", "instruction")):
        return "sft"
    return "pt" if "text" in record else None


def _read_turns(items, where: str, ck: Checker, roles: dict, role_key: str, content_key: str):
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


def _tool_call(message: dict, at: str, ck: Checker) -> str | None:
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


def _history(record: dict, ck: Checker) -> list[_Turn] | None:
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


def _check_order(turns: list[_Turn], ck: Checker) -> None:
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


def _messages(turns: list[_Turn], ck: Checker) -> list[dict]:
    """The normalised messages, with a warning for each empty one."""
    for turn in turns:
        if not turn.content.strip():
            ck.warning(turn.content_field, f"empty {'user' if turn.role in USER_SIDE else 'assistant'} turn")
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def _system_and_tools(record: dict, inline: str | None, ck: Checker) -> tuple[str | None, str | None]:
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


def _sft(record: dict, ck: Checker) -> tuple[dict | None, str]:
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


def _response(record: dict, key: str, ck: Checker) -> str | None:
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


def _text_prompt(record: dict, where: str, ck: Checker) -> list[_Turn] | None:
    """A string prompt (`prompt` or `question`) after an optional alpaca-style `history`."""
    turns, text = _history(record, ck), _string(record, where, where, ck)
    return None if turns is None or text is None else [*turns, _Turn("user", text, where, where, where)]


def _preference(record: dict, ck: Checker) -> tuple[dict | None, str]:
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


def _pt(record: dict, ck: Checker) -> tuple[dict | None, str]:
    text = _string(record, "text", "text", ck)
    if text is not None and not text.strip():
        ck.warning("text", "empty; the record is left out")
        return None, "text"
    return ({"text": text} if text is not None else None), "text"


_VALIDATORS = {"pt": _pt, "sft": _sft, "preference": _preference}


def validate_record(value, stage: str | None, ck: Checker) -> tuple[dict | None, str]:
    if not isinstance(value, dict):
        ck.error("", f"expected a JSON object, got {_kind(value)}")
        return None, ""
    found = detect_stage(
        value
    )  # "kto" is medicalgpt.data.unpaired's (validate_labelled), which calls this for the rest
    if found is None:
        ck.error("", f"{SHAPES[stage]} (got keys: {', '.join(map(str, value)) or 'none'})")
        return None, ""
    if stage is not None and found != stage:
        ck.error("", f"this looks like a {found} record (it has {STAGE_KEYS[found]}), but the stage is {stage}")
        return None, ""
    return _VALIDATORS[found](value, ck)
