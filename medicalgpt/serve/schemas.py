"""The requests the server accepts, as pydantic models: OpenAI's chat completion request (messages with text parts
and tool calls, tools, tool_choice, sampling options) and upstream MedicalGPT's /chat request."""

from typing import Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medicalgpt.serve.options import ChatPrompt
from medicalgpt.serve.tool_calls import answer_prefix, function_schemas, role_messages


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSchema


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def tool_choice_names_a_tool(self):
        names = [tool.function.name for tool in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} in tools")
        return self

    def prompt(self):
        """The ChatPrompt: messages in the template's roles, the tools shown (none for tool_choice none)."""
        messages = [{**m.model_dump(), "content": text_of(m.content)} for m in self.messages]
        try:
            messages = role_messages(messages)
        except ValueError as error:
            raise HTTPException(400, f"messages: {error}") from error
        if not self.tools or self.tool_choice == "none":
            return ChatPrompt(messages)
        tools = function_schemas([tool.model_dump(exclude_none=True) for tool in self.tools])
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return ChatPrompt(messages, tools, answer_prefix(choice))


class ChatRequest(BaseModel):
    input: str = Field(min_length=1)
    history: list[tuple[str, str]] = Field(default_factory=list)


def text_of(content):
    if content is None:
        return None
    return content if isinstance(content, str) else "".join(part.text for part in content)


def check_unicode(value, where="body"):
    """HTTP 400 when a string anywhere in `value` (a request's model_dump) is not valid Unicode: JSON may carry lone
    surrogates (\\ud800) that Python accepts and the tokenizer cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise HTTPException(400, f"{where}: not valid Unicode text ({error.reason})") from error
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_unicode(item, f"{where}.{index}")
