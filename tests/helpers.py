"""What the tests share: paths, the flags of a fast in-process run, writing JSONL, running a script as a user does,
(for the inference, merge, server and gradio tests) a LoRA adapter that learned four answers by heart, and (for the
preference methods' learning tests) answers that do or do not send the patient to a doctor, with the held-out
log-prob margin between them."""

import contextlib
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = [str(REPO / "data" / "pretrain" / "*.txt"), str(REPO / "data" / "finetune" / "*.jsonl")]

# Flags every in-process training run adds: fast, quiet, CPU float32.
FAST_FLAGS = ["--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none", "--disable_tqdm", "True"]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(args, cwd=REPO, timeout=300):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (make install-deepspeed: deepspeed==0.19.8 builds for CPU)",
)


def deepspeed_run(script, argv, port, config="configs/ds_zero3.json"):
    """`script` in 2 CPU processes under DeepSpeed (tests/deepspeed_cpu.py says what it lets through)."""
    launcher = [*TORCHRUN, "--master_port", str(port), "tests/deepspeed_cpu.py", script]
    return run([*launcher, *argv, "--deepspeed", config])


def lora_b_max(adapter_dir):
    """The largest |lora_B| in an adapter folder: 0 until the adapter trained (peft initialises B to zeros)."""
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return max(weight.abs().max().item() for name, weight in weights.items() if "lora_B" in name)


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


def answer_corpus():
    """The labelled replies of tests/assets/answers/*.jsonl (the answer reader's corpus), file by file, in order."""
    paths = sorted((REPO / "tests" / "assets" / "answers").glob("*.jsonl"))
    return [json.loads(line) for path in paths for line in path.open(encoding="utf-8")]


# ---------------------------------------------------------------------------------------------------------------------
# The preference methods' learning tests (DPO, ORPO, IPO, SimPO, KTO, the reward model): a preference the tiny model
# does not have, answers that recommend seeing a doctor over ones that dismiss the symptom, learned on 8 symptoms and
# measured on 4 others.
# ---------------------------------------------------------------------------------------------------------------------

SYMPTOMS = ["发烧", "咳嗽", "头痛", "胸闷", "腹泻", "皮疹", "失眠", "腰痛", "耳鸣", "眼睛红", "喉咙痛", "关节痛"]
SUBJECTS = ["孩子", "老人", "我", "我妈妈", "同事", "孕妇"]
ADVICE = ["建议尽快去医院看医生。", "请及时就医，让医生检查。", "最好去医院做个检查。", "应该找医生面诊。"]
DISMISSAL = ["不要紧，在家随便吃点药。", "没事的，忍一忍就好了。", "不用管它，过几天自己好。", "随便找点偏方试试。"]


def doctor_pairs(symptoms, seed):
    """Chosen answers recommend seeing a doctor; rejected ones do not. Wording varies from pair to pair."""
    rng = random.Random(seed)
    pairs = []
    for symptom in symptoms:
        for subject in SUBJECTS:
            opening = rng.choice(["", f"{symptom}的原因很多，", f"{subject}{symptom}时，"])
            pairs.append({"prompt": f"{subject}{symptom}了怎么办？", "chosen": opening + rng.choice(ADVICE),
                          "rejected": opening + rng.choice(DISMISSAL)})  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def write_doctor_data(root):
    """(train folder, held-out folder) of doctor pairs: 48 pairs on 8 symptoms, 24 on the 4 others."""
    train = write_jsonl(Path(root) / "train" / "pairs.jsonl", doctor_pairs(SYMPTOMS[:8], seed=0))
    held_out = write_jsonl(Path(root) / "eval" / "pairs.jsonl", doctor_pairs(SYMPTOMS[8:], seed=1))
    return train.parent, held_out.parent


def pair_tokens(data_dir, tokenizer, template="qwen"):
    from medicalgpt.data.validate import find_data_files, load_records
    from medicalgpt.processors.preference import tokenize_preference
    from medicalgpt.templates import get_conv_template

    records = load_records(find_data_files(str(data_dir), "preference"), "preference")
    return [tokenize_preference(r, get_conv_template(template), tokenizer, 512, 128) for r in records]


def logprob_margin(model_dir, data_dir, tokenizer, template="qwen"):
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt)."""
    import torch

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model

    model = load_model(ModelArguments(model_name_or_path=str(model_dir)))
    margins = []
    for pair in pair_tokens(data_dir, tokenizer, template):
        scores = []
        for answer in (pair["chosen_ids"], pair["rejected_ids"]):
            ids = torch.tensor([pair["prompt_ids"] + answer])
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            scores.append(logprobs[-len(answer) :].gather(1, targets[-len(answer) :, None]).sum().item())
        margins.append(scores[0] - scores[1])
    return sum(margins) / len(margins)


def wait_until(condition, seconds=10.0):
    """Poll `condition` until it holds; fail the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
