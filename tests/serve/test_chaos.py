"""Chaos on loopback: 32 clients misbehave at fastapi_server_demo.py for about a minute, and it goes on serving.

The server runs as a user starts it, in a subprocess, on a random model of SmolLM2-135M's width (6 of its 30 layers,
so that the minute holds hundreds of requests on a busy 2-core machine) that rarely stops by itself. Each client
runs a seeded mix of: short answers (httpx, and the openai client streaming), hang-ups before and during answers,
cancelled streams, slow readers, invalid JSON, oversized bodies, the openai client giving up on a long answer after
1 s with its default retries, and /v1/models. Then: every request that was not abandoned got its correct answer
(the greedy answer the idle server gave to the same prompt beforehand; each client's requests carry their own
top_p, unused at temperature 0, so that no two clients share a batch and each answer is bit for bit the reference),
p95 latency of the short requests is under P95_BOUND_S, the worker is alive, resident memory grew less than 50 MB
over at least 500 requests, and /v1/models answers.
"""

import concurrent.futures
import json
import random
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import ENV, REPO, free_port, wait_for_http

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.multiprocess
CLIENTS, SECONDS, MIN_REQUESTS, P95_BOUND_S = 32, 60, 500, 20.0
PROMPTS = [f"Question {n}: what helps with a cough?" for n in range(8)]
SHORT_TOKENS = 4
LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1000, "temperature": 0}


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def short_body(prompt, top_p, stream=False):
    messages = [{"role": "user", "content": prompt}]
    return {"messages": messages, "max_tokens": SHORT_TOKENS, "temperature": 0, "top_p": top_p, "stream": stream}


def raw_post(port, body, content_length=None, rcvbuf=None):
    """A socket that sent POST /v1/chat/completions with `body` (and a Content-Length that may lie)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    length = len(body) if content_length is None else content_length
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {length}"
    sock.sendall(head.encode() + b"\r\n\r\n" + body)
    return sock


class Client:
    """One misbehaving client; `record` gets (kind, correct or None for abandoned, latency)."""

    def __init__(self, index, url, port, references, record):
        self.index, self.url, self.port, self.references, self.record = index, url, port, references, record
        self.random = random.Random(index)
        self.top_p = 0.5 + index / 200  # this client's own options: never batched with another's
        self.http = httpx.Client(base_url=url, timeout=120)
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)

    def run(self, deadline):
        actions = [self.short, self.short, self.short_stream, self.hang_up_before, self.hang_up_during,
                   self.cancelled_stream, self.slow_reader, self.invalid_json, self.oversized, self.give_up,
                   self.models]  # fmt: skip
        while time.monotonic() < deadline:
            self.random.choice(actions)()

    def short(self):
        prompt = self.random.choice(PROMPTS)
        start = time.monotonic()
        reply = self.http.post("/v1/chat/completions", json=short_body(prompt, self.top_p))
        text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.text
        self.record("short", text == self.references[prompt], time.monotonic() - start)

    def short_stream(self):
        prompt = self.random.choice(PROMPTS)
        start = time.monotonic()
        body = short_body(prompt, self.top_p, stream=True)
        chunks = self.openai.chat.completions.create(model="chaos", **body)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        self.record("short", text == self.references[prompt], time.monotonic() - start)

    def hang_up_before(self):
        raw_post(self.port, json.dumps({**LONG, "top_p": self.top_p}).encode()).close()
        self.record("hang-up before the answer", None, 0)

    def hang_up_during(self):
        body = {**LONG, "top_p": self.top_p, "stream": True}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            if stream.status_code != 200:  # refused: a failure, not a hang-up
                return self.record(f"hang-up during the answer: {stream.status_code}", False, 0)
            next(line for line in stream.iter_lines() if '"content"' in line)
        self.record("hang-up during the answer", None, 0)

    def cancelled_stream(self):
        stream = self.openai.chat.completions.create(model="chaos", stream=True, **{**LONG, "top_p": self.top_p})
        next(iter(stream))
        stream.close()
        self.record("cancelled stream", None, 0)

    def slow_reader(self):
        body = json.dumps({**LONG, "top_p": self.top_p, "stream": True}).encode()
        with raw_post(self.port, body, rcvbuf=4096) as sock:
            for _ in range(6):
                sock.recv(16)
                time.sleep(0.5)
        self.record("slow reader", None, 0)

    def invalid_json(self):
        reply = self.http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "json"})
        self.record("invalid JSON", reply.status_code == 400, 0)

    def oversized(self):
        with raw_post(self.port, b"{" * 1000, content_length=50_000_000) as sock:
            answer = sock.recv(200)
        self.record("oversized body", answer.startswith(b"HTTP/1.1 413"), 0)

    def give_up(self):
        quitter = self.openai.with_options(timeout=1.0)  # and its 2 default retries: three abandoned requests
        with pytest.raises(openai.APITimeoutError):
            quitter.chat.completions.create(model="chaos", **{**LONG, "top_p": self.top_p})
        self.record("gave up after 1 s, 3 tries", None, 0)

    def models(self):
        self.record("models", self.http.get("/v1/models").json()["data"][0]["id"] == "chaos", 0)


def test_32_misbehaving_clients_for_a_minute(slow_model):
    port, model = free_port(), slow_model(layers=6)
    command = [sys.executable, "fastapi_server_demo.py", "--base_model", model, "--port", str(port),
               "--served_model_name", "chaos", "--temperature", "0", "--max_queue", "64",
               "--request_timeout", "120"]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v1/models", server)
        references = {}
        for prompt in PROMPTS:
            reply = httpx.post(f"{url}/v1/chat/completions", json=short_body(prompt, 0.99), timeout=120).json()
            assert reply["usage"]["completion_tokens"] == SHORT_TOKENS, "the random model must not stop by itself"
            references[prompt] = reply["choices"][0]["message"]["content"]
        results = []
        record = lambda kind, correct, latency: results.append((kind, correct, latency))  # noqa: E731
        warm_up = Client(99, url, port, references, record)
        for action in (warm_up.short, warm_up.short_stream, warm_up.slow_reader, warm_up.hang_up_during):
            action()
        time.sleep(2)
        rss_before, start = rss_mb(server.pid), time.monotonic()
        clients = [Client(index, url, port, references, record) for index in range(CLIENTS)]
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            for future in [pool.submit(client.run, start + SECONDS) for client in clients]:
                future.result()
        while len(results) < MIN_REQUESTS:  # a busy machine made the minute short of requests
            clients[0].models()
        time.sleep(3)  # the last abandoned generations are dropped
        rss_after = rss_mb(server.pid)

        wrong = [(kind, latency) for kind, correct, latency in results if correct is False]
        assert not wrong, f"wrong or missing answers: {wrong[:10]}"
        latencies = sorted(latency for kind, _, latency in results if kind == "short")
        p95 = latencies[int(0.95 * (len(latencies) - 1))]
        kinds = {kind: sum(1 for k, _, _ in results if k == kind) for kind, _, _ in results}
        growth = rss_after - rss_before
        print(json.dumps({"requests": len(results), "kinds": kinds, "short_p95_s": round(p95, 2),
                          "short_max_s": round(latencies[-1], 2), "rss_growth_mb": round(growth, 1)}))  # fmt: skip
        assert p95 < P95_BOUND_S, f"p95 latency of short requests {p95:.1f} s"
        assert len(kinds) == 9 and kinds["short"] >= 50
        assert growth < 50, f"resident memory grew {growth:.0f} MB"
        assert server.poll() is None and httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == "chaos"
        reply = httpx.post(f"{url}/v1/chat/completions", json=short_body(PROMPTS[0], 0.99), timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == references[PROMPTS[0]]
    finally:
        server.terminate()
        server.wait(30)


def test_issue_27_scenario_hang_ups_then_short_requests_then_sigterm(slow_model, capsys):
    """bench/server_stall.py on the full SmolLM2-135M shape (30 layers): 1,900 tokens take minutes here. Bounds are
    for a busy 2-core machine (a quiet one answers in about a fifth of them); the old server gave no answer in 40 s."""
    from bench import server_stall

    figures = server_stall.main(["--model_dir", slow_model(layers=30), "--port", str(free_port()), "--patience", "60"])
    assert json.loads(capsys.readouterr().out) == figures
    assert figures["short_beside_long_s"] < 15 and figures["short_after_hangup_s"] < 15
    assert figures["eight_after_3_hangups_s"] < 30
    assert figures["sigterm_exit_s"] < 5
