"""Can one client stall the API server for the others? Issue 27's scenario, timed: fastapi_server_demo.py in a
subprocess on a random model of SmolLM2-135M's shape (tens of ms a token on 2 cores; greedy, it rarely stops).

    python -m bench.server_stall                        # this checkout's server
    python -m bench.server_stall --repo /tmp/before     # another checkout's (git worktree add /tmp/before <commit>)

Prints one JSON object, seconds each (a figure equal to --patience: no answer in that time):
  short_alone_s            a 5-token request on the idle server
  short_beside_long_s      the same while another client reads a 1,900-token stream
  short_after_hangup_s     after a client (the openai client: 1 s timeout, its 2 default retries) gave up on a
                           1,900-token request
  eight_after_3_hangups_s  the slowest of 8 concurrent 5-token requests after three such clients gave up
  sigterm_exit_s           from SIGTERM, a generation running, to the process's exit (killed at --patience)
The server runs with --threads torch threads (default 1: on a 2-core machine shared with other jobs, two threads
made each token 6x slower). The model is built once into --model_dir (random weights, seed 0, the tiny model's
tokenizer: text is noise, timings are real).
"""

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from bench.common import REPO, load_average, model_path, pinned_threads_env

SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True)  # fmt: skip
SHORT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5, "temperature": 0}
LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1900, "temperature": 0}


def build_slow_model(folder, tokenizer_dir=None, layers=30):
    """A random LlamaForCausalLM of SmolLM2-135M's shape (`layers` of its 30) with a tiny model's tokenizer, saved
    in `folder` (kept: built once)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_SHAPE, "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def start_server(repo, model, port, threads, extra=()):
    command = [sys.executable, "fastapi_server_demo.py", "--base_model", model, "--port", str(port),
               "--temperature", "0", *extra]  # fmt: skip
    env = pinned_threads_env({**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo}, threads)
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline:
        assert process.poll() is None, "the server exited while starting"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    raise TimeoutError("the server did not start in 300 s")


def timed_post(url, body, patience):
    """Seconds until the answer (200), else `patience`."""
    start = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=patience)
        return round(time.perf_counter() - start, 2) if response.status_code == 200 else patience
    except httpx.TimeoutException:
        return patience


def give_up(url):
    """What a user with the openai client and a 1 s timeout does: three tries, each abandoned after 1 s."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=1.0)  # max_retries: the default 2
    try:
        client.chat.completions.create(model=client.models.list().data[0].id, **LONG)
    except openai.APITimeoutError:
        pass


def short_beside_long(url, patience):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=patience) as long:
        lines = long.iter_lines()
        next(line for line in lines if '"content"' in line)  # the long answer is under way
        return timed_post(url, SHORT, patience)  # leaving the block hangs the long stream up


def sigterm_exit(process, url, patience):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=patience) as long:
        next(line for line in long.iter_lines() if '"content"' in line)
        start = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(patience)
            return round(time.perf_counter() - start, 2)
        except subprocess.TimeoutExpired:
            process.kill()
            return patience


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=REPO, help="the checkout whose fastapi_server_demo.py runs")
    parser.add_argument("--model_dir", help="where the model is built once (default: a folder in the temp dir)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--patience", type=float, default=40.0)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (1: steady when busy)")
    args = parser.parse_args(argv)

    folder = args.model_dir or os.path.join(tempfile.gettempdir(), f"medicalgpt-smollm2-shape-{args.layers}-layers")
    model = build_slow_model(folder, layers=args.layers)
    process, url = start_server(os.path.abspath(args.repo), model, args.port, args.threads)
    patience, result = args.patience, {"benchmark": "server_stall", "repo": os.path.abspath(args.repo)}
    try:
        timed_post(url, SHORT, 120)  # warm-up: the first pass over new shapes is slow
        result["short_alone_s"] = timed_post(url, SHORT, patience)
        result["short_beside_long_s"] = short_beside_long(url, patience)
        give_up(url)
        result["short_after_hangup_s"] = timed_post(url, SHORT, patience)
        for _ in range(3):
            give_up(url)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            result["eight_after_3_hangups_s"] = max(pool.map(lambda _: timed_post(url, SHORT, patience), range(8)))
        result["sigterm_exit_s"] = sigterm_exit(process, url, patience)
    finally:
        if process.poll() is None:
            process.kill()
    result.update(layers=args.layers, threads=args.threads, patience_s=patience, load_average=load_average())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
