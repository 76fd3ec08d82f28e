"""Shared fixtures: a tiny Qwen2-style model and tokenizer built offline once per test session."""

import os

import pytest

from tests.helpers import CORPUS, FAST_FLAGS, REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """Tokenised data is cached between runs (medicalgpt.train.records): here in a temporary folder,
    also for the scripts the tests start as subprocesses, not in ~/.cache."""
    import datasets

    folder = str(tmp_path_factory.mktemp("hf-datasets-cache"))
    os.environ["HF_DATASETS_CACHE"] = datasets.config.HF_DATASETS_CACHE = folder
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from medicalgpt.quickstart.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen")), CORPUS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


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
