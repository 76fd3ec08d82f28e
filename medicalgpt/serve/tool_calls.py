"""OpenAI tool calling on top of the chat engine, in the tool format the templates train on.

The request's `tools` are rendered by the template into the system prompt (its `# Tools` section), one function
schema per line, as tool-calling SFT data renders its `tools` (`{"name", "description", "parameters"}`: the
`function` object of each OpenAI tool). The model calls a tool by answering
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (one block per call); those blocks become the
reply's `tool_calls`. An assistant message that carried `tool_calls` is rendered as that answer again, and `tool`
messages as `<tool_response>` observations (consecutive results in one user turn, as Qwen's template does).

`tool_choice`: `auto` (the default): the model decides; `none`: the tools are not shown to the model; `required`:
the answer is made to start with `<tool_call>`; `{"type": "function", "function": {"name": N}}`: the answer is made
to start with the call of N and the model writes its arguments. Made to start: the text is appended to the prompt.
"""

import json
import uuid

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULTS_JOIN = "\n</tool_response>\n<tool_response>\n"  # between two results of one observation turn


def function_schemas(tools):
    """OpenAI tools ({"type": "function", "function": {...}}) -> the function schemas that SFT data lists."""
    return [tool["function"] for tool in tools]


def answer_prefix(tool_choice):
    """The text a tool_choice makes the answer start with ("" for auto and none)."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if tool_choice == "required":
        return CALL_OPEN + "\n"
    name = json.dumps(tool_choice["function"]["name"], ensure_ascii=False)
    # Ends before the space that starts the arguments: trained text tokenises " {" together, so the model writes it.
    return CALL_OPEN + '\n{"name": ' + name + ', "arguments":'


def role_messages(messages):
    """OpenAI messages (dicts) -> the template's roles: an assistant's tool_calls become a function_call message,
    tool results observations. ValueError when a call's arguments are not a JSON object."""
    converted = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_of(call["function"]) for call in message["tool_calls"]]
            converted.append({"role": "function_call", "content": json.dumps(calls, ensure_ascii=False)})
        elif role == "tool" and converted and converted[-1]["role"] == "observation":
            converted[-1]["content"] += RESULTS_JOIN + content
        else:
            converted.append({"role": "observation" if role == "tool" else role, "content": content})
    return converted


def _call_of(function):
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"tool_calls: arguments of {function['name']!r} are not JSON: {error}") from error
    return {"name": function["name"], "arguments": arguments}


def parse_tool_calls(text):
    """The model's answer -> (its text before the first call, or None when empty; [OpenAI tool calls]). An answer
    whose <tool_call> blocks do not all hold {"name", "arguments"} JSON is plain text: (text, [])."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for block in text[start:].split(CALL_OPEN)[1:]:
        try:
            call = json.loads(block.split(CALL_CLOSE)[0])
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append(openai_call(call["name"], call.get("arguments", {})))
    return text[:start].strip() or None, calls


def openai_call(name, arguments):
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    function = {"name": name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


class ToolCallSplitter:
    """Streamed text pieces -> ("content", text) events for the text before the first <tool_call> (text that may be
    its beginning is held back), then ("tool_calls", calls) at the end; the held text as content if no call parses.
    Fed one piece at a time (feed), then end(): the server's streams are asynchronous."""

    def __init__(self):
        self.held, self.in_call = "", False

    def feed(self, piece):
        self.held += piece
        if self.in_call:
            return []
        start = self.held.find(CALL_OPEN)
        if start >= 0:
            before, self.held, self.in_call = self.held[:start], self.held[start:], True
        else:
            keep = max((n for n in range(1, len(CALL_OPEN)) if self.held.endswith(CALL_OPEN[:n])), default=0)
            before, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return [("content", before)] if before else []

    def end(self):
        _, calls = parse_tool_calls(self.held) if self.in_call else (self.held, [])
        if calls:
            return [("tool_calls", calls)]
        return [("content", self.held)] if self.held else []


def tool_call_events(pieces):
    """ToolCallSplitter over an iterable of pieces."""
    splitter = ToolCallSplitter()
    for piece in pieces:
        yield from splitter.feed(piece)
    yield from splitter.end()
