"""Requests per second and latency of the API server under concurrent clients (fastapi_server_demo.py's app).

    python -m bench.server_latency                           # the tiny model, 16 clients, on 127.0.0.1
    python -m bench.server_latency --clients 16 --requests_per_client 8 --max_tokens 32 --max_batch_size 1

The server runs in this process under uvicorn on a free loopback port; each client is a thread sending
`POST /v1/chat/completions` one request after another. Prints one JSON object: requests per second, latency
percentiles (p50, p95) and answer tokens per second. `--max_batch_size 1` turns the request batching off.
An untimed round of the same load comes first (on CPU, the first pass over new tensor shapes is slow).
"""

import argparse
import concurrent.futures
import json
import statistics
import threading
import time

import httpx

from bench.common import model_path, sample_questions
from medicalgpt.serve.chat import ChatArguments, GenerationOptions, load_chat_engine
from medicalgpt.serve.server import build_app


def start_server(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_clients(url, questions, clients, per_client, max_tokens):
    def client(index):
        latencies, tokens = [], 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for n in range(per_client):
                question = questions[(index * per_client + n) % len(questions)]
                messages = [{"role": "user", "content": question}]
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
        return latencies, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return time.perf_counter() - start, [x for lat, _ in results for x in lat], sum(t for _, t in results)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: models/tiny-qwen, else a tiny model built now)")
    parser.add_argument("--lora_model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=8)
    args = parser.parse_args(argv)

    engine = load_chat_engine(ChatArguments(base_model=model_path(args.model), lora_model=args.lora_model))
    app = build_app(engine, "bench", defaults=GenerationOptions(temperature=0), max_batch_size=args.max_batch_size)
    server, url = start_server(app)
    questions = sample_questions(64)
    run_clients(url, questions, args.clients, 2, args.max_tokens)  # warm-up: torch's first meeting with each shape
    seconds, latencies, tokens = run_clients(url, questions, args.clients, args.requests_per_client, args.max_tokens)
    server.should_exit = True
    result = {
        "benchmark": "server_latency",
        "model": engine.model.config._name_or_path,
        "clients": args.clients,
        "requests": len(latencies),
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "latency_max_s": round(max(latencies), 3),
        "completion_tokens_per_s": round(tokens / seconds, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
