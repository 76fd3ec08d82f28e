"""The HTTP API of fastapi_server_demo.py: upstream MedicalGPT's `POST /chat` and an OpenAI-compatible API.

    GET  /v1/models
    POST /v1/chat/completions   messages, max_tokens (or max_completion_tokens), temperature, top_p, stop, stream,
                                tools and tool_choice (medicalgpt/serve/tools.py)
    POST /chat                  {"input": "...", "history": [["q", "a"], ...]} -> {"response": "...", "history": ...}

With an API key, every request needs `Authorization: Bearer KEY` (else 401). Bad requests (malformed JSON, missing
or invalid fields, max_tokens below 1 or beyond the context, prompts longer than the context) get a 4xx answer with
an OpenAI-style JSON error body; the server goes on serving. Non-streaming requests wait in one queue served by one
worker thread: requests with the same sampling options that wait together are generated as one batch. Streams run
one at a time on the engine's lock. No two generations ever share state.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from typing import Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from medicalgpt.serve.chat import ChatEngine, ChatPrompt, GenerationOptions
from medicalgpt.serve.tools import answer_prefix, function_schemas, parse_tool_calls, role_messages, tool_call_events

logger = logging.getLogger(__name__)


class GenerationResponse(StreamingResponse):
    """A streamed answer whose generation stops when the response ends, also when the client hangs up. Starlette
    stops reading a synchronous body iterator on a disconnect without closing it, so the generator's own cleanup
    would wait for the garbage collector; the generation would go on holding the engine meanwhile."""

    def __init__(self, content, stream, **kwargs):
        super().__init__(content, **kwargs)
        self.stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.cancel()


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


class BatchQueue:
    """One worker thread answers queued requests; those with equal options that wait together form one batch."""

    def __init__(self, engine: ChatEngine, max_batch_size=8):
        self.engine, self.max_batch_size = engine, max_batch_size
        self._pending = collections.deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._serve, name="generation-worker", daemon=True).start()

    def submit(self, messages, options) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        with self._ready:
            self._pending.append((messages, options, future))
            self._ready.notify()
        return future

    def _next_batch(self):
        with self._ready:
            while not self._pending:
                self._ready.wait()
            options = self._pending[0][1]
            batch = [item for item in self._pending if item[1] == options][: self.max_batch_size]
            for item in batch:
                self._pending.remove(item)
        return batch, options

    def _serve(self):
        while True:
            batch, options = self._next_batch()
            try:
                completions = self.engine.generate([messages for messages, _, _ in batch], options)
            except Exception as error:  # reported to every request of the batch; the worker goes on
                logger.exception("Generation failed")
                for _, _, future in batch:
                    future.set_exception(error)
                continue
            for (_, _, future), completion in zip(batch, completions):
                future.set_result(completion)


def error_body(message, error_type="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status, message, **kwargs):
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def text_of(content):
    if content is None:
        return None
    return content if isinstance(content, str) else "".join(part.text for part in content)


class ChatService:
    """What the routes share: the engine, its batch queue, the served name and the default sampling options."""

    def __init__(self, engine: ChatEngine, model_name, defaults: GenerationOptions, max_batch_size):
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.batches = BatchQueue(engine, max_batch_size)

    def encode(self, messages):
        try:
            return self.engine.encode(messages)
        except ValueError as error:
            raise HTTPException(400, f"messages: {error}") from error

    def room_after(self, prompt_tokens, max_tokens):
        """Tokens left for the answer; 400 when the prompt (plus max_tokens) does not fit the context."""
        context = self.engine.context_length
        room = context - prompt_tokens
        if room < 1 or (max_tokens or 0) > room:
            wanted = f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens or 1})"
            raise HTTPException(400, f"{wanted} exceeds the model's context of {context} tokens")
        return room

    def options_for(self, request: ChatCompletionRequest, prompt_tokens):
        max_tokens = request.max_completion_tokens or request.max_tokens
        room = self.room_after(prompt_tokens, max_tokens)
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        if len(stops) > 4 or not all(stops):
            raise HTTPException(400, "stop: at most 4 non-empty strings")
        defaults = self.defaults
        return GenerationOptions(
            max_new_tokens=max_tokens or min(defaults.max_new_tokens, room),
            temperature=defaults.temperature if request.temperature is None else request.temperature,
            top_p=defaults.top_p if request.top_p is None else request.top_p,
            repetition_penalty=defaults.repetition_penalty,
            stop=tuple(stops),
        )

    async def complete(self, messages, options):
        return await asyncio.wrap_future(self.batches.submit(messages, options))


router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    card = {"id": request.app.state.service.model_name, "object": "model", "created": int(time.time())}
    return {"object": "list", "data": [{**card, "owned_by": "medicalgpt"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = request.app.state.service
    if body.model not in (None, service.model_name):
        raise HTTPException(404, f"The model {body.model!r} does not exist; this server has {service.model_name!r}")
    prompt = body.prompt()
    options = service.options_for(body, len(service.encode(prompt)))
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        stream = service.engine.stream(prompt, options)
        events = sse_events(stream, reply_id, created, service.model_name, usage, prompt)
        headers = {"Cache-Control": "no-cache"}
        return GenerationResponse(events, stream, media_type="text/event-stream", headers=headers)
    completion = await service.complete(prompt, options)
    message, finish_reason = reply_message(prompt, completion)
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": [choice], "usage": usage_of(completion)}  # fmt: skip


@router.post("/chat")
async def chat(body: ChatRequest, request: Request):
    """Upstream MedicalGPT's endpoint: {"input", "history": [[q, a], ...]} -> {"response", "history"}."""
    service = request.app.state.service
    messages = []
    for question, answer in body.history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": body.input})
    room = service.room_after(len(service.encode(messages)), None)
    options = dataclasses.replace(service.defaults, max_new_tokens=min(service.defaults.max_new_tokens, room))
    completion = await service.complete(messages, options)
    return {"response": completion.text, "history": [*body.history, (body.input, completion.text)]}


def build_app(engine: ChatEngine, model_name="medicalgpt", api_key=None, defaults=None, max_batch_size=8):
    """The FastAPI app. `defaults` (GenerationOptions) fill in what a request leaves out."""
    app = FastAPI(title="MedicalGPT API", version="1.0")
    app.state.service = ChatService(engine, model_name, defaults or GenerationOptions(), max_batch_size)
    app.include_router(router)
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if expected and not hmac.compare_digest(given, expected):
            message = "Invalid or missing API key (send Authorization: Bearer KEY)"
            return error_response(401, message, code="invalid_api_key")
        return await call_next(request)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    return app


async def invalid_request(request, error):
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(400, problems or "invalid request")


async def http_error(request, error):
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(error.status_code, str(error.detail), error_type=kind)


async def server_error(request, error):
    logger.exception("Request failed")
    return error_response(500, f"internal error: {type(error).__name__}", error_type="server_error")


def reply_message(prompt, completion):
    """(the assistant message, finish_reason); with tools shown, the answer's <tool_call> blocks are its tool_calls."""
    if not prompt.tools:
        return {"role": "assistant", "content": completion.text}, completion.finish_reason
    content, calls = parse_tool_calls(prompt.answer_prefix + completion.text)
    if not calls:
        return {"role": "assistant", "content": content}, completion.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def usage_of(completion):
    total = completion.prompt_tokens + completion.completion_tokens
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": total}  # fmt: skip


def sse_events(stream, reply_id, created, model_name, include_usage, prompt=None):
    """Server-sent events of a streamed answer, as the openai client reads them; ends with `data: [DONE]`. With tools,
    the text of the tool calls is held back and sent as one `tool_calls` delta at the end."""

    def event(delta, finish_reason=None, **extra):
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": [choice] if delta is not None else [], **extra}  # fmt: skip
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    finish_reason = None
    try:
        for kind, value in stream_events(stream, prompt):
            if kind == "content":
                yield event({"content": value})
            else:
                yield event({"tool_calls": [{"index": i, **call} for i, call in enumerate(value)]})
                finish_reason = "tool_calls"
    except Exception as error:  # the status line is already sent: report in the stream
        logger.exception("Streaming failed")
        yield f"data: {json.dumps(error_body(f'generation failed: {type(error).__name__}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield event({}, finish_reason or stream.completion.finish_reason)
    if include_usage:
        yield event(None, usage=usage_of(stream.completion))
    yield "data: [DONE]\n\n"


def stream_events(stream, prompt):
    """("content", text) per streamed piece; with tools, tool_call_events over the answer, its prefix included."""
    if prompt is None or not prompt.tools:
        return (("content", piece) for piece in stream)
    return tool_call_events(itertools.chain([prompt.answer_prefix], stream))
