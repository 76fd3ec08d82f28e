"""Streamed answers as server-sent events, the way the openai client reads them, and the response that sends them:
it ends the generation when the stream ends for any reason (the answer is done, the client hung up, the server is
stopping) and ends the stream when the client stops reading for `stall_timeout` seconds."""

import asyncio
import json
import logging

from starlette.responses import StreamingResponse

from medicalgpt.serve.scheduler import Cancelled, GenerationFailed, ShuttingDown, TimedOut
from medicalgpt.serve.tool_calls import ToolCallSplitter

logger = logging.getLogger(__name__)


class ReaderStalled(Exception):
    """The client read nothing of the stream for stall_timeout seconds."""


class EventStream(StreamingResponse):
    """The events of one ticket's answer; the ticket is cancelled when the response ends, however it ends."""

    def __init__(self, events, ticket, stall_timeout, **kwargs):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, **kwargs)
        self.ticket, self.stall_timeout = ticket, stall_timeout

    async def __call__(self, scope, receive, send):
        async def send_or_give_up(message):
            try:
                async with asyncio.timeout(self.stall_timeout):
                    await send(message)
            except TimeoutError:
                raise ReaderStalled from None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except ReaderStalled:  # the connection is closed unfinished: the client sees a broken stream
            logger.warning("A client read nothing for %g s: its stream is ended", self.stall_timeout)
        finally:
            self.ticket.cancel("the stream ended")


def error_body(message, error_type="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def failure_body(error):
    """The error body for a request that failed after it was accepted (also sent inside a stream)."""
    kinds = {TimedOut: "timeout", ShuttingDown: "server_shutting_down", Cancelled: "cancelled"}
    if isinstance(error, (TimedOut, ShuttingDown, Cancelled, GenerationFailed)):
        return error_body(str(error), kinds.get(type(error), "server_error"))
    return error_body(f"generation failed: {type(error).__name__}", "server_error")


def usage_of(completion):
    total = completion.prompt_tokens + completion.completion_tokens
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": total,
    }


async def sse_events(ticket, reply_id, created, model_name, include_usage, prompt=None):
    """Server-sent events of a streamed answer; ends with `data: [DONE]`. With tools, the text of the tool calls is
    held back and sent as one `tool_calls` delta at the end. A failure after the first event is an error event."""

    def event(delta, finish_reason=None, **extra):
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        chunk = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [choice] if delta is not None else [],
            **extra,
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def events_of(pairs):
        nonlocal finish_reason
        for kind, value in pairs:
            if kind == "content":
                yield event({"content": value})
            else:
                yield event({"tool_calls": [{"index": i, **call} for i, call in enumerate(value)]})
                finish_reason = "tool_calls"

    yield event({"role": "assistant", "content": ""})
    splitter = ToolCallSplitter() if prompt is not None and prompt.tools else None
    finish_reason = None
    try:
        if splitter is not None:
            for text in events_of(splitter.feed(prompt.answer_prefix)):
                yield text
        async for piece in ticket.pieces():
            for text in events_of(splitter.feed(piece) if splitter else [("content", piece)]):
                yield text
        for text in events_of(splitter.end() if splitter else []):
            yield text
    except Exception as error:  # the status line is already sent: report in the stream
        if not isinstance(error, (TimedOut, ShuttingDown, Cancelled)):
            logger.warning("A streamed generation failed: %s", error)
        yield f"data: {json.dumps(failure_body(error), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield event({}, finish_reason or ticket.completion.finish_reason)
    if include_usage:
        yield event(None, usage=usage_of(ticket.completion))
    yield "data: [DONE]\n\n"
