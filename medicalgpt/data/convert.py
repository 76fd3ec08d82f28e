"""Convert SFT data between formats: read any accepted input (alpaca, sharegpt, OpenAI messages, question/answer
records or CSV/TSV columns), validate it with `medicalgpt.data.validate`, write it as sharegpt, messages or alpaca.

Every output record is built from the validator's normalised record, so what it holds (turns, `system`, alpaca's
`history`, `tools`, tool calls and results) is exactly what training would see, and it validates again.
"""

from __future__ import annotations

import json

INPUT_TYPES = ("auto", "alpaca", "sharegpt", "messages", "qa", "json2jsonl")
OUTPUT_FORMATS = ("sharegpt", "messages", "alpaca", "same")
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "function_call": "function_call", "observation": "observation"}
# Column (or key) names accepted for question/answer data, e.g. a CSV header `question,answer`.
QUESTION_KEYS = ("question", "input", "instruction", "prompt", "query", "q", "问题")
ANSWER_KEYS = ("answer", "output", "response", "a", "回答", "答案")
SHAPE_KEYS = {"alpaca": "instruction", "sharegpt": "conversations", "messages": "messages"}


def check_input_type(value, data_type: str):
    """(record, problem): `value` as the validator should see it for `--data_type`; qa records become alpaca."""
    if not isinstance(value, dict) or data_type in ("auto", "json2jsonl"):
        return value, None
    if data_type == "qa":
        question = next((key for key in QUESTION_KEYS if key in value), None)
        answer = next((key for key in ANSWER_KEYS if key in value), None)
        if question is None or answer is None:
            return None, f"not a question/answer record: expected one of {QUESTION_KEYS} and one of {ANSWER_KEYS}"
        return {"instruction": value[question], "output": value[answer]}, None
    if SHAPE_KEYS[data_type] not in value:
        return None, f"not a {data_type} record: no {SHAPE_KEYS[data_type]!r} (got keys: {', '.join(map(str, value))})"
    return value, None


def table_records(rows, data_type: str):
    """(line, cells, problem) rows of a CSV/TSV file -> (line, record, problem) units. The first row is a header
    when it names a question and an answer column (or instruction and output); otherwise columns are positional:
    question, answer (2 columns) or instruction, input, output (3 columns)."""
    header = None
    for index, (line, cells, problem) in enumerate(rows):
        if problem:
            yield line, None, problem
            continue
        names = [cell.strip().lower() for cell in cells]
        if index == 0 and _is_header(names):
            header = names
            continue
        yield (line, *_table_record(cells, header, data_type))


def _is_header(names: list[str]) -> bool:
    has = {name for name in names if name in QUESTION_KEYS + ANSWER_KEYS + ("system",)}
    return (bool(has & set(QUESTION_KEYS)) and bool(has & set(ANSWER_KEYS))) or {"instruction", "output"} <= has


def _table_record(cells: list[str], header: list[str] | None, data_type: str):
    if header is None:
        columns = {"qa": 2, "alpaca": 3}.get(data_type) or (len(cells) if len(cells) in (2, 3) else None)
        if columns is None or len(cells) != columns:
            expected = (
                f"{columns} columns" if columns else "2 columns (question, answer) or 3 (instruction, input, output)"
            )
            return None, f"expected {expected}, got {len(cells)}; or give the file a header row"
        header = ["question", "answer"] if columns == 2 else ["instruction", "input", "output"]
    elif len(cells) != len(header):
        return None, f"expected {len(header)} cells as in the header row, got {len(cells)}"
    row = {name: cell for name, cell in zip(header, cells) if cell != "" or name in ("input", "output", "answer")}
    if "instruction" in row and "output" in row:
        return {key: row[key] for key in ("instruction", "input", "output", "system") if key in row}, None
    return check_input_type(row, "qa")


def to_sharegpt(record: dict) -> dict:
    """A normalised SFT record -> {"conversations": [{"from", "value"}, ...], "tools"?}; a system prompt is the
    first turn (`from: system`), as upstream MedicalGPT reads it."""
    turns = [{"from": "system", "value": record["system"]}] if record.get("system") is not None else []
    turns += [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in record["messages"]]
    return _with_tools({"conversations": turns}, record)


def to_messages(record: dict) -> dict:
    """A normalised SFT record -> OpenAI {"messages": [...], "tools"?}: tool calls as `tool_calls`, results as
    `tool` messages."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
    messages += [_openai_message(message) for message in record["messages"]]
    return _with_tools({"messages": messages}, record)


def _openai_message(message: dict) -> dict:
    role, content = message["role"], message["content"]
    if role == "observation":
        return {"role": "tool", "content": content}
    if role != "function_call":
        return {"role": role, "content": content}
    try:
        call = json.loads(content)
    except json.JSONDecodeError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return {"role": "function_call", "content": content}  # several calls, or not JSON: kept as written
    arguments = call.get("arguments", {})
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    function = {"name": call["name"], "arguments": arguments}
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}


def to_alpaca(record: dict) -> dict:
    """A normalised SFT record -> {"instruction", "input", "output", "history"?, "system"?, "tools"?}.
    Raises ValueError for tool calls or tool results, which alpaca has no place for."""
    messages = record["messages"]
    if any(message["role"] not in ("user", "assistant") for message in messages):
        raise ValueError(
            "alpaca has no place for tool calls or tool results: use --output_format sharegpt or messages"
        )
    pairs = [[query["content"], answer["content"]] for query, answer in zip(messages[::2], messages[1::2])]
    out = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if len(pairs) > 1:
        out["history"] = pairs[:-1]
    if record.get("system") is not None:
        out["system"] = record["system"]
    return _with_tools(out, record)


def _with_tools(out: dict, record: dict) -> dict:
    if record.get("tools"):
        out["tools"] = record["tools"]
    return out


WRITERS = {"sharegpt": to_sharegpt, "messages": to_messages, "alpaca": to_alpaca}
