"""Tool schemas, tool calls and tool results in the one format every template renders: the one Qwen2.5/Qwen3 were
trained on (see the package docstring)."""

import json

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
CALL_ERROR = 'function_call content must be JSON {"name": ..., "arguments": ...} or a list of them, got '


def parse_tools(tools) -> list:
    """Tools as a list of schemas: accepts a JSON string, a list, or None/""."""
    if not tools:
        return []
    if isinstance(tools, str):
        tools = json.loads(tools)
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a JSON list of function schemas, got {type(tools).__name__}")
    return tools


def parse_tool_calls(content: str) -> list[tuple[str, object]]:
    """A function_call message's content -> [(name, arguments)]."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as error:
        raise ValueError(CALL_ERROR + repr(content)) from error
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
        raise ValueError(CALL_ERROR + repr(content))
    return [(call["name"], _parse_arguments(call.get("arguments", {}))) for call in calls]


def _is_call(call) -> bool:
    return isinstance(call, dict) and isinstance(call.get("name"), str)


def _parse_arguments(arguments):
    """Tool-call arguments; a JSON string (OpenAI style) is decoded."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError as error:
        raise ValueError(f"function_call arguments must be a JSON object: {arguments!r}") from error


def format_tools(tools: list) -> str:
    """The `# Tools` system section: one JSON schema per line inside <tools></tools>."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def format_tool_calls(content: str) -> str:
    """A function_call message's content -> `<tool_call>` blocks, as Qwen's template renders tool calls."""
    blocks = []
    for name, arguments in parse_tool_calls(content):
        call = '{"name": "' + name + '", "arguments": ' + json.dumps(arguments, ensure_ascii=False) + "}"
        blocks.append("<tool_call>\n" + call + "\n</tool_call>")
    return "\n".join(blocks)


def format_observation(content: str) -> str:
    """A tool result -> the `<tool_response>` block sent as the user turn."""
    return "<tool_response>\n" + content + "\n</tool_response>"
