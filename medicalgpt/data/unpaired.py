"""KTO records: one answer to a context and a boolean `label` (true: desirable, false: undesirable), as doctors'
thumbs-up / thumbs-down give them. Checked and normalised like the other stages (medicalgpt.data.shapes).

Accepted shapes, each with "label": true | false (and the optional "system" / "tools" of the other stages):
    {"prompt": str | [messages ending with a user turn], "completion": str | [one assistant message]}
    {"conversations": [sharegpt turns ending with the judged gpt turn]}
    {"messages": [OpenAI messages ending with the judged assistant message]}
    {"instruction", "input"?, "output", "history"?}
A preference pair (any shape medicalgpt.data.shapes accepts) is one desirable and one undesirable example.

Normalised: the preference context (messages ending with a user-side turn, "system", "tools") plus
"completion": str, "label": bool and "rejected": str | None (a pair: completion is the chosen answer, label true).
"""

from __future__ import annotations

from medicalgpt.data.shapes import (
    MESSAGE_ROLES,
    SHAPES,
    SHAREGPT_ROLES,
    UNPAIRED_KEYS,
    USER_SIDE,
    Checker,
    _check_order,
    _history,
    _kind,
    _messages,
    _preference,
    _read_turns,
    _response,
    _string,
    _system_and_tools,
    _text_prompt,
    _Turn,
    detect_stage,
    validate_record,
)

PAIR_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")
PAIR_LABEL = (
    "a preference pair takes no label (its chosen answer is desirable, its rejected one undesirable): "
    "drop the label, or give each answer as a record of its own"
)


def validate_labelled(value, stage: str | None, ck: Checker) -> tuple[dict | None, str]:
    """`medicalgpt.data.shapes.validate_record` with the kto stage: a record with a label (stage None or kto), or a
    preference pair when the stage is kto."""
    if isinstance(value, dict) and (stage == "kto" or (stage is None and detect_stage(value) == "kto")):
        return validate_unpaired(value, ck)
    return validate_record(value, stage, ck)


def validate_unpaired(record: dict, ck: Checker) -> tuple[dict | None, str]:
    """One KTO record (or preference pair) -> its normalised shape and the format's name."""
    if any(key in record for key in PAIR_KEYS):
        if "label" in record:  # a label on a pair would be read by no one: say so rather than drop it
            ck.error("label", PAIR_LABEL)
        pair, kind = _preference(record, ck)
        if pair is None:
            return None, kind
        chosen, rejected = pair.pop("chosen"), pair.pop("rejected")
        return {**pair, "completion": chosen, "label": True, "rejected": rejected}, kind
    if not any(key in record for key in UNPAIRED_KEYS):
        ck.error("", f"{SHAPES['kto']} (got keys: {', '.join(map(str, record)) or 'none'})")
        return None, ""
    label = _label(record, ck)
    turns, inline_system, completion, kind, where = _context_and_answer(record, ck)
    system, tools = _system_and_tools(record, inline_system, ck)
    if turns is None or completion is None or label is None or ck.errors:
        return None, kind
    _check_order(turns, ck)
    if not turns:
        ck.error(where, "the context has no user turn")
    elif turns[-1].role not in USER_SIDE:
        ck.error(where, f"the context must end with a user turn, not {turns[-1].label}")
    if ck.errors:
        return None, kind
    context = {"messages": _messages(turns, ck), "system": system, "tools": tools}
    return {**context, "completion": completion, "label": label, "rejected": None}, kind


def _label(record: dict, ck: Checker) -> bool | None:
    label = record.get("label")
    if label is None:
        problem = "missing" if "label" not in record else "null"
        ck.error("label", f"{problem}: true for a desirable answer, false for an undesirable one")
        return None
    if not isinstance(label, bool):
        ck.error("label", f"expected true or false, got {_kind(label)} {label!r}")
        return None
    return label


def _context_and_answer(record: dict, ck: Checker):
    """(context turns, the conversation's leading system message, the judged answer, format name, field)."""
    if "completion" in record or "prompt" in record:
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            turns, system = _read_turns(prompt, "prompt", ck, MESSAGE_ROLES, "role", "content")
        else:
            turns, system = _text_prompt(record, "prompt", ck), None
        return turns, system, _response(record, "completion", ck), "prompt_completion_label", "prompt"
    if "conversations" in record or "messages" in record:
        where = "conversations" if "conversations" in record else "messages"
        if where == "conversations":
            turns, system = _read_turns(record[where], where, ck, SHAREGPT_ROLES, "from", "value")
        else:
            turns, system = _read_turns(record[where], where, ck, MESSAGE_ROLES, "role", "content")
        answer = _last_answer(turns, ck)
        return (turns[:-1] if turns else turns), system, answer, f"{where}_label", where
    turns = _history(record, ck)
    instruction = _string(record, "instruction", "instruction", ck)
    extra = _string(record, "input", "input", ck, required=False)
    output = _string(record, "output", "output", ck)
    if turns is not None and instruction is not None:
        prompt = f"{instruction}\n{extra}" if extra else instruction
        turns.append(_Turn("user", prompt, "instruction", "instruction", "instruction"))
    return turns, None, output, "alpaca_label", "instruction"


def _last_answer(turns, ck: Checker) -> str | None:
    """The judged answer: the conversation's last turn, which must be the assistant's."""
    if not turns:
        return None
    last = turns[-1]
    if last.role in USER_SIDE:
        ck.error(last.where, f"the conversation ends with a user turn ({last.label}): there is no answer to judge")
        return None
    if not last.content.strip():
        ck.error(last.content_field, "empty answer")
        return None
    return last.content
