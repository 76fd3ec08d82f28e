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


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """Tokenised data is cached between runs (medicalgpt.training.to_dataset): here in a temporary folder, also for
    the scripts the tests start as subprocesses, not in ~/.cache."""
    import datasets

    folder = str(tmp_path_factory.mktemp("hf-datasets-cache"))
    os.environ["HF_DATASETS_CACHE"] = datasets.config.HF_DATASETS_CACHE = folder
    return folder


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


@pytest.fixture(scope="session")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA SFT adapter on the tiny model, as `supervised_finetuning.py` writes it (one step)."""
    import supervised_finetuning

    out = tmp_path_factory.mktemp("sft") / "outputs-sft-qwen-v1"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(REPO / "data" / "finetune"), "--do_train"]
    argv += ["--template_name", "qwen", "--use_peft", "True", "--max_steps", "1", "--output_dir", str(out)]
    supervised_finetuning.main([*argv, "--max_train_samples", "8", *FAST_FLAGS])
    return str(out)


@pytest.fixture(scope="session")
def rm_adapter_dir(sft_adapter_dir, tmp_path_factory):
    """A LoRA reward-model adapter on the SFT adapter, as `reward_modeling.py` writes it (one step)."""
    import reward_modeling

    out = tmp_path_factory.mktemp("rm") / "outputs-rm-qwen-v1"
    argv = ["--model_name_or_path", sft_adapter_dir, "--train_file_dir", str(REPO / "data" / "reward"), "--do_train"]
    argv += ["--template_name", "qwen", "--use_peft", "True", "--max_steps", "1", "--output_dir", str(out)]
    reward_modeling.main([*argv, "--max_train_samples", "8", *FAST_FLAGS])
    return str(out)
