"""fastapi_server_demo.py: the official openai client against the server on loopback, plain and streaming."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from medicalgpt.serve.chat import GenerationOptions
from medicalgpt.serve.server import build_app
from tests.helpers import ANSWERS, QA_PAIRS, REPO, free_port, qa_adapter, qa_engine, serving, wait_for_http

openai = pytest.importorskip("openai")
KEY = "test-key-123"
MODEL = "outputs-sft-qwen-v1"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir):
    return qa_engine(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def server(engine):
    """The app under uvicorn on a free loopback port, in a thread of this process."""
    app = build_app(engine, MODEL, api_key=KEY, defaults=GenerationOptions(temperature=0, max_new_tokens=30))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(question):
    return [{"role": "user", "content": question}]


def test_openai_client_lists_the_model_and_gets_the_trained_answer_with_usage(client, engine):
    assert [model.id for model in client.models.list().data] == [MODEL]
    question, answer = QA_PAIRS[0]
    reply = client.chat.completions.create(model=MODEL, messages=ask(question), temperature=0, max_tokens=30)
    assert reply.choices[0].message.content == answer
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    prompt_tokens = len(engine.encode(ask(question)))
    answer_tokens = len(engine.tokenizer.encode(answer, add_special_tokens=False)) + 1  # + <|im_end|>
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, answer_tokens)
    assert reply.usage.total_tokens == prompt_tokens + answer_tokens


def test_max_tokens_and_stop_are_honoured(client):
    question, answer = QA_PAIRS[2]  # "Warm water and rest."
    short = client.chat.completions.create(model=MODEL, messages=ask(question), temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert answer.startswith(short.choices[0].message.content)
    cut = client.chat.completions.create(model=MODEL, messages=ask(question), temperature=0, stop=["and"])
    assert cut.choices[0].message.content == "Warm water " and cut.choices[0].finish_reason == "stop"


def test_openai_client_streams_the_answer_in_chunks(client, engine):
    question, answer = QA_PAIRS[2]
    stream = client.chat.completions.create(
        model=MODEL, messages=ask(question), temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(engine.tokenizer.encode(answer, add_special_tokens=False)) + 1


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "messages": ask(QA_PAIRS[1][0]), "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == QA_PAIRS[1][1]


def test_conversation_history_is_the_context(client):
    (q1, a1), (q2, a2), *_ = QA_PAIRS
    history = [*ask(q1), {"role": "assistant", "content": a1}, *ask(q2)]
    reply = client.chat.completions.create(model=MODEL, messages=history, temperature=0)
    assert reply.choices[0].message.content == a2


def test_upstream_chat_endpoint(server):
    (q1, a1), (q2, a2), *_ = QA_PAIRS
    headers = {"Authorization": f"Bearer {KEY}"}
    first = httpx.post(f"{server}/chat", json={"input": q1}, headers=headers, timeout=60).json()
    assert first["response"] == a1
    second = httpx.post(f"{server}/chat", json={"input": q2, "history": first["history"]}, headers=headers, timeout=60)
    assert second.json() == {"response": a2, "history": [[q1, a1], [q2, a2]]}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_every_endpoint_needs_the_api_key(server, headers):
    requests = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/chat"), ("GET", "/docs"),
                ("GET", "/openapi.json"), ("GET", "/no-such-page")]  # fmt: skip
    for method, path in requests:
        body = {"input": "hi"} if method == "POST" else None
        response = httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, path
        assert "API key" in response.json()["error"]["message"]


def test_openai_client_with_a_wrong_key_gets_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=ask("hi"))


GOOD = ask("hi")
BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400),
    ("/v1/chat/completions", b"[]", 400),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [*GOOD, *GOOD]}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "max_tokens": -5}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "max_tokens": 10**9}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "max_tokens": "many"}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "temperature": -1}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "top_p": 0}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "n": 2}, 400),
    ("/v1/chat/completions", {"messages": GOOD, "stop": [""]}, 400),
    ("/v1/chat/completions", {"messages": ask("发烧 " * 3000)}, 400),
    ("/v1/chat/completions", {"messages": ask("发烧 " * 3000), "stream": True}, 400),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": GOOD}, 404),
    ("/chat", {}, 400),
    ("/chat", {"input": ""}, 400),
    ("/chat", {"input": "hi", "history": [["only a question"]]}, 400),
    ("/chat", {"input": "发烧 " * 3000}, 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', 400),  # lone surrogate
    ("/chat", b'{"input": "hi", "history": [["\\udfff", "a"]]}', 400),
]


def test_malformed_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for path, body, status in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["message"], body
    reply = httpx.post(f"{server}/chat", json={"input": QA_PAIRS[3][0]}, headers=headers, timeout=60)
    assert reply.status_code == 200 and reply.json()["response"] == QA_PAIRS[3][1]


def test_16_concurrent_clients_all_get_their_own_answer_in_shared_batches(client, monkeypatch):
    from medicalgpt.serve import scheduler

    batches = []

    class RecordingDecoding(scheduler.Decoding):
        def __init__(self, engine, prompts, *args):
            batches.append(len(prompts))
            super().__init__(engine, prompts, *args)

    monkeypatch.setattr(scheduler, "Decoding", RecordingDecoding)

    def one(index):
        question = QA_PAIRS[index % 4][0]
        if index % 4 == 3:
            chunks = client.chat.completions.create(model=MODEL, messages=ask(question), temperature=0, stream=True)
            return question, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(model=MODEL, messages=ask(question), temperature=0, max_tokens=30)
        return question, reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    assert all(answer == ANSWERS[question] for question, answer in results)
    assert sum(batches) == 16 and len(batches) < 16, f"waiting requests must share batches: {batches}"


def test_tutorial_server_command_serves_on_loopback_with_the_key_from_env(tiny_model_dir, tmp_path_factory):
    adapter = qa_adapter(tmp_path_factory, tiny_model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MEDICALGPT_API_KEY": KEY}
    command = [sys.executable, "fastapi_server_demo.py", "--base_model", tiny_model_dir, "--lora_model", adapter,
               "--template_name", "qwen", "--port", str(port), "--temperature", "0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
        wait_for_http(f"{url}/v1/models", process, headers)
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
        reply = httpx.post(f"{url}/chat", json={"input": QA_PAIRS[0][0]}, headers=headers, timeout=60)
        assert reply.json()["response"] == QA_PAIRS[0][1]
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()
        assert models["data"][0]["id"] == "outputs-sft-qwen-v1"
    finally:
        process.terminate()
        process.wait(30)


def test_vllm_script_dry_run_prints_the_server_command(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "TENSOR_PARALLEL_SIZE": "2", "PORT": "9001", "SERVED_MODEL_NAME": "med"}
    merged = subprocess.run(["sh", "vllm_deployment.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.splitlines()[0] == (
        "python -m vllm.entrypoints.openai.api_server --model merged-sft-qwen-v1 --served-model-name med "
        "--host 127.0.0.1 --port 9001 --tensor-parallel-size 2"
    )
    lora_env = {**env, "BASE_MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "LORA_MODEL": "outputs sft"}
    lora = subprocess.run(["sh", "vllm_deployment.sh"], cwd=REPO, env=lora_env, capture_output=True, text=True)
    assert "--enable-lora --lora-modules 'med-lora=outputs sft'" in lora.stdout
    assert '"model": "med-lora"' in lora.stdout
    tools = subprocess.run(["sh", "vllm_deployment.sh"], cwd=REPO, env={**env, "TOOL_CALL_PARSER": "hermes"},
                           capture_output=True, text=True)  # fmt: skip
    assert tools.stdout.splitlines()[0].endswith("--enable-auto-tool-choice --tool-call-parser hermes")
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "vllm_deployment.sh"], cwd=REPO, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


FAKE_VLLM = """
import http.server, json, os, time
time.sleep(1.5)  # loading the model: the health endpoint is not up yet
class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())
    def do_GET(self):
        self.reply({})
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply({"choices": [{"message": {"content": "fake answer for " + request["model"]}}]})
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_vllm_script_waits_for_health_before_the_sample_request(tmp_path):
    """vLLM needs a GPU: a stand-in server that is slow to come up checks the script's own logic."""
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "PORT": str(free_port()), "HEALTH_TIMEOUT": "60"}
    process = subprocess.Popen(["sh", "vllm_deployment.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Serving "):
                break
        output = "".join(lines)
        assert "Waiting for" in output and "fake answer for medicalgpt" in output, output
    finally:
        process.terminate()
        process.wait(10)


def test_latency_benchmark_prints_its_figures(tiny_model_dir, capsys):
    from bench import server_latency

    result = server_latency.main(["--model", tiny_model_dir, "--clients", "3", "--requests_per_client", "2",
                                  "--max_tokens", "4"])  # fmt: skip
    assert json.loads(capsys.readouterr().out) == result
    assert result["requests"] == 6 and 0 < result["latency_p50_s"] <= result["latency_p95_s"]


def test_a_client_that_hangs_up_mid_stream_ends_the_generation(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "stop_ids", [len(engine.tokenizer) + 1000])  # never ends by itself
    body = {"messages": ask("随便说点什么"), "max_tokens": 3000, "temperature": 1.0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: hang up
    deadline = time.time() + 10
    while not engine._lock.acquire(timeout=0.1):
        assert time.time() < deadline, "the generation must stop when its client is gone"
    engine._lock.release()
    monkeypatch.undo()
    reply = httpx.post(f"{server}/chat", json={"input": QA_PAIRS[0][0]}, headers=headers, timeout=60)
    assert reply.json()["response"] == QA_PAIRS[0][1]
