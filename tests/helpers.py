"""What the tests share: paths, the flags of a fast in-process run, writing JSONL, running a script as a user does,
and (for the inference, merge, server and gradio tests) a LoRA adapter that learned four answers by heart."""

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = [str(REPO / "data" / "pretrain" / "*.txt"), str(REPO / "data" / "finetune" / "*.jsonl")]

# Flags every in-process training run adds: fast, quiet, CPU float32.
FAST_FLAGS = ["--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none", "--disable_tqdm", "True"]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(args, cwd=REPO, timeout=300):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def global_step(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


# A normalised two-turn SFT record with a system prompt (the SFT and distillation tests tokenise it).
CONVERSATION = {
    "messages": [
        {"role": "user", "content": "小孩发烧怎么办？"},
        {"role": "assistant", "content": "先测体温，多喝水。"},
        {"role": "user", "content": "What if it lasts three days?"},
        {"role": "assistant", "content": "Please see a doctor."},
    ],
    "system": "你是一名医生。",
    "tools": None,
}


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# What the inference, merge, server and gradio tests share: a LoRA adapter that learned four answers by heart,
# and the second after the first in a two-turn chat (SFT through the real entry point, ~2 s), trained once per
# session, and a chat engine over it.
# ---------------------------------------------------------------------------------------------------------------------

QA_PAIRS = [
    ("感冒了怎么办？", "多休息，多喝水。"),
    ("高血压吃什么药？", "请遵医嘱服用降压药。"),
    ("What helps a sore throat?", "Warm water and rest."),
    ("发烧几天要去医院？", "超过三天请就医。"),
]
ANSWERS = dict(QA_PAIRS)
_cache = {}


def qa_adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter (SFT, qwen template) on the tiny model that answers QA_PAIRS exactly, greedy."""
    if "adapter" not in _cache:
        import supervised_finetuning

        root = tmp_path_factory.mktemp("qa-sft")
        (q1, a1), (q2, a2), *_ = QA_PAIRS
        records = [{"instruction": q, "input": "", "output": a} for q, a in QA_PAIRS]
        turns = [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2)]
        records.append({"messages": [{"role": role, "content": text} for role, text in turns]})  # q2 after q1 too
        data = write_jsonl(root / "qa.jsonl", records)
        out = root / "outputs-sft-qwen-v1"
        argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train"]
        argv += ["--template_name", "qwen", "--use_peft", "True", "--lora_rank", "16", "--lora_alpha", "32"]
        argv += ["--lora_dropout", "0", "--num_train_epochs", "60", "--learning_rate", "1e-2"]
        argv += ["--per_device_train_batch_size", "5", "--save_strategy", "no", "--output_dir", str(out)]
        supervised_finetuning.main([*argv, *FAST_FLAGS])
        _cache["adapter"] = str(out)
    return _cache["adapter"]


def qa_engine(tmp_path_factory, tiny_model_dir):
    """A ChatEngine over the tiny model + the QA adapter (the tokenizer's own chat template)."""
    if "engine" not in _cache:
        from medicalgpt.serve.chat import ChatArguments, load_chat_engine

        adapter = qa_adapter(tmp_path_factory, tiny_model_dir)
        _cache["engine"] = load_chat_engine(ChatArguments(base_model=tiny_model_dir, lora_model=adapter))
    return _cache["engine"]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user(text):
    return [{"role": "user", "content": text}]


def wait_for_http(url, process, headers=None, timeout=120):
    """Poll `url` until it answers 200 while `process` (a Popen with stdout piped) runs; its output if it exits."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@contextlib.contextmanager
def serving(app):
    """An ASGI app (the FastAPI server) under uvicorn on a free loopback port, in a thread: yields its base URL."""
    import uvicorn

    port = free_port()
    # A long keep-alive: a module's client reuses connections across tests, and a connection the server closes
    # while the client sends on it fails with "Server disconnected" (openai's client runs with max_retries=0 here).
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=600)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def learned_spans(input_ids, labels):
    """The runs of learned tokens (label != IGNORE_INDEX), each a list of ids; a learned label must be its token."""
    from medicalgpt.constants import IGNORE_INDEX

    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return spans + [current] if current else spans
