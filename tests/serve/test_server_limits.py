"""fastapi_server_demo.py's app against clients that hang up, give up, flood, send too much, stop reading or fail."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from medicalgpt.serve import scheduler as scheduling
from medicalgpt.serve.chat import GenerationOptions
from medicalgpt.serve.server import ServerLimits, build_app
from tests.helpers import ENV, QA_PAIRS, REPO, free_port, qa_engine, serving, user, wait_for_http, wait_until

openai = pytest.importorskip("openai")
LONG = {"messages": user("Tell me everything."), "max_tokens": 2000, "temperature": 1.0}


def settled(scheduler, seconds=1.0):
    """The worker takes no step for `seconds` (after the one that may be under way): nothing is generating."""
    time.sleep(0.3)
    steps = scheduler.steps
    time.sleep(seconds)
    return scheduler.steps == steps


def test_a_client_that_gives_up_stops_its_generation_retries_included(endless_engine):
    app = build_app(endless_engine, "m", defaults=GenerationOptions(temperature=0, max_new_tokens=5))
    scheduler = app.state.service.scheduler
    with serving(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=0.5)
        wait_until(lambda: scheduler.held == 0, 3)  # polled every 0.1 s: gone within one step of the poll
        assert settled(scheduler)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=0.5)  # its 2 retries, as shipped
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", **LONG)
        wait_until(lambda: scheduler.held == 0, 3)
        assert settled(scheduler)
        reply = httpx.post(f"{url}/chat", json={"input": "hi"}, timeout=30).json()
        assert isinstance(reply["response"], str) and scheduler.alive


def test_limits_get_400_413_503_with_retry_after_and_504(endless_engine):
    limits = ServerLimits(max_queue=1, request_timeout=1.0, max_tokens_limit=2000, max_body_bytes=4000)
    app = build_app(endless_engine, "m", defaults=GenerationOptions(temperature=0), limits=limits)
    with serving(app) as url:
        post = f"{url}/v1/chat/completions"
        over = httpx.post(post, json={**LONG, "max_tokens": 2001}, timeout=30)
        assert over.status_code == 400 and "--max_tokens_limit" in over.json()["error"]["message"]
        big = {"messages": user("x" * 5000)}
        assert httpx.post(post, json=big, timeout=30).status_code == 413
        chunked = httpx.post(post, content=iter([json.dumps(big).encode()]), timeout=30)  # no Content-Length
        assert chunked.status_code == 413 and "4000 bytes" in chunked.json()["error"]["message"]
        with httpx.stream("POST", post, json={**LONG, "stream": True}, timeout=30) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if '"content"' in line)
            busy = httpx.post(post, json={"messages": user("hi"), "max_tokens": 2}, timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
            assert "--max_queue 1" in busy.json()["error"]["message"]
            rest = [line for line in lines if line]  # the stream runs into the 1 s timeout
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert error["type"] == "timeout" and rest[-1] == "data: [DONE]"
        start = time.monotonic()
        timed_out = httpx.post(post, json=LONG, timeout=30)
        assert timed_out.status_code == 504 and 1.0 <= time.monotonic() - start < 5
        assert "--request_timeout" in timed_out.json()["error"]["message"]


def test_a_failing_generation_gets_500_with_its_message_and_the_next_is_answered(tmp_path_factory, tiny_model_dir,
                                                                                monkeypatch):  # fmt: skip
    engine = qa_engine(tmp_path_factory, tiny_model_dir)
    poison = engine.encode(user("poison"))

    class Failing(scheduling.Decoding):
        def step(self):
            if self.sequences.shape[1] >= len(poison) and self.sequences[0, : len(poison)].tolist() == poison:
                raise RuntimeError("bad tensor")
            return super().step()

    monkeypatch.setattr(scheduling, "Decoding", Failing)
    app = build_app(engine, "m", defaults=GenerationOptions(temperature=0, max_new_tokens=30))
    with serving(app) as url:
        failed = httpx.post(f"{url}/v1/chat/completions", json={"messages": user("poison")}, timeout=30)
        assert failed.status_code == 500 and "RuntimeError: bad tensor" in failed.json()["error"]["message"]
        question, answer = QA_PAIRS[0]
        assert httpx.post(f"{url}/chat", json={"input": question}, timeout=30).json()["response"] == answer


def asgi_post(body):
    """The ASGI scope of `POST /v1/chat/completions` with this JSON body, as uvicorn builds it."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}  # fmt: skip


def test_an_asgi_server_that_cancels_the_request_on_hang_up_cancels_its_generation(endless_engine):
    """Hypercorn and timeout wrappers cancel the request's task instead of reporting a disconnect."""
    app = build_app(endless_engine, "m")
    scheduler = app.state.service.scheduler
    body = json.dumps(LONG).encode()

    async def run():
        async def receive():
            if not receive.done:
                receive.done = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            raise AssertionError(f"nothing is sent to a client that is gone: {message}")

        receive.done = False
        task = asyncio.create_task(app(asgi_post(body), receive, send))
        await asyncio.sleep(0.5)
        assert scheduler.held == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    wait_until(lambda: scheduler.held == 0, 3)
    assert settled(scheduler, 0.5) and scheduler.alive


def test_a_stream_whose_client_stops_reading_is_ended_and_its_generation_stopped(endless_engine):
    app = build_app(endless_engine, "m", limits=ServerLimits(stall_timeout=0.5, buffer_limit=8))
    scheduler = app.state.service.scheduler
    body = json.dumps({**LONG, "stream": True}).encode()
    scope = asgi_post(body)
    sent = []

    async def run():
        requested = asyncio.Event()

        async def receive():
            if not requested.is_set():
                requested.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never hangs up

        async def send(message):
            sent.append(message)
            if len(sent) > 3:  # the client's buffers are full: nothing more goes out
                await asyncio.Event().wait()

        await asyncio.wait_for(app(scope, receive, send), 10)

    start = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - start < 5 and sent[0]["status"] == 200
    wait_until(lambda: scheduler.held == 0, 3)
    assert settled(scheduler, 0.5) and scheduler.alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_server_within_seconds_with_generations_running_and_queued(slow_model, sig):
    port, model = free_port(), slow_model(layers=2)
    command = [sys.executable, "fastapi_server_demo.py", "--base_model", model, "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v1/models", server)
        queued = {}

        def wait_for_answer():
            try:
                queued["status"] = httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=60).status_code
            except httpx.TransportError as error:
                queued["status"] = type(error).__name__

        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if '"content"' in line)
            waiting = threading.Thread(target=wait_for_answer)
            waiting.start()
            time.sleep(0.5)
            start = time.monotonic()
            server.send_signal(sig)
            server.wait(10)
            stopped = time.monotonic() - start
            rest = list(lines)
        waiting.join(10)
        assert stopped < 5, f"exited {stopped:.1f} s after the signal"
        assert any("server_shutting_down" in line for line in rest), rest[-3:]
        assert queued["status"] == 503
        with socket.socket() as again:  # the port is free again for a server (which, as uvicorn, reuses addresses)
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
            again.listen()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert os.path.isdir(model)


@pytest.mark.parametrize("flag", ["--max_queue", "--max_tokens_limit", "--request_timeout"])
def test_a_limit_below_1_is_a_one_line_error_before_the_model_loads(flag):
    import fastapi_server_demo
    from medicalgpt.errors import UsageError

    with pytest.raises(UsageError, match="--max_queue, --max_tokens_limit, --max_batch_size must be >= 1"):
        fastapi_server_demo.main(["--base_model", "no/such-model", flag, "0"])
