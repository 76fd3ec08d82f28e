"""Shared fixtures: a tiny Qwen2-style model and tokenizer built offline once per test session."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent
CORPUS = [str(REPO / "data" / "pretrain" / "*.txt"), str(REPO / "data" / "finetune" / "*.jsonl")]

# Flags every in-process training run adds: fast, quiet, CPU float32.
FAST_FLAGS = ["--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none", "--disable_tqdm", "True"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from medicalgpt.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen")), CORPUS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def weights_of(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}
