"""The HTTP API of fastapi_server_demo.py: upstream MedicalGPT's `POST /chat` and an OpenAI-compatible API.

    GET  /v1/models
    POST /v1/chat/completions   messages, max_tokens (or max_completion_tokens), temperature, top_p, stop, stream,
                                tools and tool_choice (medicalgpt/serve/tool_calls.py)
    POST /chat                  {"input": "...", "history": [["q", "a"], ...]} -> {"response": "...", "history": ...}

With an API key, every request needs `Authorization: Bearer KEY` (else 401). Bad requests (malformed JSON, missing
or invalid fields, max_tokens below 1 or above --max_tokens_limit, prompts longer than the context) get a 4xx answer
with an OpenAI-style JSON error body; bodies above max_body_bytes get 413. Every generation runs on one worker that
interleaves them a token at a time (medicalgpt/serve/scheduler.py). A client that hangs up, streaming or not,
stops its generation within one step; more than --max_queue requests at once get 503 with Retry-After; a request
past --request_timeout gets 504 and its generation is stopped; SIGTERM and Ctrl-C cancel every generation and the
server exits within seconds (run_server).
"""

import asyncio
import dataclasses
import logging
import time
import uuid

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medicalgpt.serve.chat import ChatEngine
from medicalgpt.serve.gate import Gate
from medicalgpt.serve.options import GenerationOptions
from medicalgpt.serve.scheduler import Cancelled, GenerationFailed, Scheduler, ServerBusy, ShuttingDown, TimedOut
from medicalgpt.serve.schemas import ChatCompletionRequest, ChatRequest, check_unicode
from medicalgpt.serve.sse import EventStream, error_body, failure_body, sse_events, usage_of
from medicalgpt.serve.tool_calls import parse_tool_calls

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 2  # what a busy server asks clients to wait (the openai client honours Retry-After)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What keeps one client from stalling the others; the defaults keep a 2-core machine responsive."""

    max_queue: int = 16  # requests held at once, generating or waiting to start; then 503
    request_timeout: float = 300.0  # seconds from arrival to the last token; then 504 and the generation stops
    max_tokens_limit: int = 2048  # the most max_tokens a request may ask for; above it 400
    max_body_bytes: int = 4 * 1024 * 1024  # request bodies above it get 413
    stall_timeout: float = 30.0  # a stream whose client reads nothing this long is ended
    buffer_limit: int = 64  # text pieces held for a slow reader before its generation waits for it
    disconnect_poll: float = 0.1  # how often a waiting non-streamed request checks that its client is still there


def error_response(status, message, headers=None, **kwargs):
    return JSONResponse(error_body(message, **kwargs), status_code=status, headers=headers)


class ChatService:
    """What the routes share: the engine, the scheduler, the served name, the default options and the limits."""

    def __init__(self, engine: ChatEngine, model_name, defaults: GenerationOptions, max_batch_size, limits):
        self.engine, self.model_name, self.defaults, self.limits = engine, model_name, defaults, limits
        self.scheduler = Scheduler(
            engine, max_batch_size, limits.max_queue, limits.request_timeout, limits.buffer_limit, limits.stall_timeout
        )

    def encode(self, messages):
        try:
            return self.engine.encode(messages)
        except ValueError as error:
            raise HTTPException(400, f"messages: {error}") from error

    def room_after(self, prompt_tokens, max_tokens):
        """Tokens left for the answer; 400 when max_tokens is above the limit or the prompt does not fit."""
        limit = self.limits.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            message = f"max_tokens ({max_tokens}) is above this server's limit of {limit} (--max_tokens_limit)"
            raise HTTPException(400, message)
        context = self.engine.context_length
        room = context - prompt_tokens
        if room < 1 or (max_tokens or 0) > room:
            wanted = f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens or 1})"
            raise HTTPException(400, f"{wanted} exceeds the model's context of {context} tokens")
        return min(room, limit)

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

    def submit(self, ids, options):
        try:
            return self.scheduler.submit(ids, options)
        except ServerBusy as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        except ShuttingDown as error:
            raise HTTPException(503, str(error)) from error

    async def complete(self, request: Request, ids, options):
        """The Completion of a non-streamed request; its generation is cancelled as soon as the client is gone
        (checked every disconnect_poll seconds) or when this task is cancelled (a server that cancels on hang-up)."""
        ticket = self.submit(ids, options)
        answer = asyncio.ensure_future(ticket.result())
        try:
            while not answer.done():
                await asyncio.wait([answer], timeout=self.limits.disconnect_poll)
                if not answer.done() and await request.is_disconnected():
                    ticket.cancel("the client disconnected")
            return answer.result()
        finally:
            ticket.cancel("the request ended")
            if not answer.done():
                answer.cancel()


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
    check_unicode(body.model_dump())
    prompt = body.prompt()
    ids = service.encode(prompt)
    options = service.options_for(body, len(ids))
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        ticket = service.submit(ids, options)
        events = sse_events(ticket, reply_id, created, service.model_name, usage, prompt)
        return EventStream(events, ticket, service.limits.stall_timeout)
    completion = await service.complete(request, ids, options)
    message, finish_reason = reply_message(prompt, completion)
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": service.model_name,
        "choices": [choice],
        "usage": usage_of(completion),
    }


@router.post("/chat")
async def chat(body: ChatRequest, request: Request):
    """Upstream MedicalGPT's endpoint: {"input", "history": [[q, a], ...]} -> {"response", "history"}."""
    service = request.app.state.service
    check_unicode(body.model_dump())
    messages = []
    for question, answer in body.history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": body.input})
    ids = service.encode(messages)
    room = service.room_after(len(ids), None)
    options = dataclasses.replace(service.defaults, max_new_tokens=min(service.defaults.max_new_tokens, room))
    completion = await service.complete(request, ids, options)
    return {"response": completion.text, "history": [*body.history, (body.input, completion.text)]}


def build_app(
    engine: ChatEngine,
    model_name="medicalgpt",
    api_key=None,
    defaults=None,
    max_batch_size=8,
    limits: ServerLimits | None = None,
):
    """The FastAPI app, behind the Gate (API key, body size). `defaults` (GenerationOptions) fill in what a request
    leaves out. `app.state.service.scheduler` is its generation worker."""
    limits = limits or ServerLimits()
    app = FastAPI(title="MedicalGPT API", version="1.0", lifespan=stop_generating_on_shutdown)
    app.state.service = ChatService(engine, model_name, defaults or GenerationOptions(), max_batch_size, limits)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for failure, status in ((GenerationFailed, 500), (TimedOut, 504), (ShuttingDown, 503), (Cancelled, 499)):
        app.add_exception_handler(failure, failed_request(status))
    app.add_exception_handler(Exception, server_error)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app


async def stop_generating_on_shutdown(app):
    yield
    app.state.service.scheduler.close()


async def invalid_request(request, error):
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(400, problems or "invalid request")


async def http_error(request, error):
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(error.status_code, str(error.detail), error.headers, error_type=kind)


def failed_request(status):
    async def handler(request, error):
        return JSONResponse(failure_body(error), status_code=status)

    return handler


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


def run_server(app, host, port, graceful_timeout=5.0):
    """uvicorn on host:port until SIGTERM or Ctrl-C. The signal first stops the scheduler, which fails every
    generation, running or queued, with 503 at once: uvicorn's graceful shutdown, which waits for open requests,
    then takes moments, and `graceful_timeout` bounds the rest (a client that reads nothing)."""
    import uvicorn

    scheduler = app.state.service.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's signal handler (0.55): only sets flags; stop() sets an event
            scheduler.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down
        pass
    finally:
        scheduler.close()
