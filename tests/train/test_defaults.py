"""Defaults that fit the device: no bf16 autocast or gradient checkpointing on CPU unless asked (device.py)."""

import logging

import pytest
import torch
from trl import SFTConfig

import supervised_finetuning
from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, SupervisedArguments
from medicalgpt.device import fit_to_device
from medicalgpt.parser import parse_args
from tests.helpers import write_jsonl

SFT_TYPES = (SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments)


def parsed(tmp_path, *flags):
    training, *_ = parse_args(*SFT_TYPES, argv=["--output_dir", str(tmp_path), *flags])
    return training.bf16, training.fp16, training.gradient_checkpointing


def test_trl_config_on_cpu_defaults_to_float32_without_checkpointing(tmp_path):
    assert not torch.cuda.is_available()
    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True, "trl's own default, which we override"
    assert parsed(tmp_path) == (False, False, False)


@pytest.mark.parametrize("flags, expected", [
    (["--bf16"], (True, False, False)),  # the tutorial's bare flag
    (["--bf16", "True", "--gradient_checkpointing", "True"], (True, False, True)),
    (["--gradient_checkpointing"], (False, False, True)),
    (["--bf16", "False", "--no_gradient_checkpointing"], (False, False, False)),
])  # fmt: skip
def test_explicit_flags_keep_their_meaning_on_cpu(tmp_path, flags, expected):
    assert parsed(tmp_path, *flags) == expected


def test_config_file_keys_count_as_given(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\nbf16: true\ngradient_checkpointing: true\n")
    training, *_ = parse_args(*SFT_TYPES, argv=[str(config)])
    assert (training.bf16, training.gradient_checkpointing) == (True, True)


@pytest.mark.parametrize("kind, expected", [
    ("cuda-bf16", {"bf16": True, "fp16": False, "gradient_checkpointing": True}),  # trl's checkpointing kept
    ("cuda", {"bf16": False, "fp16": True, "gradient_checkpointing": True}),  # no bf16: fp16 autocast, scaled
    ("accelerator", {"bf16": False, "fp16": False, "gradient_checkpointing": True}),
    ("cpu", {"bf16": False, "fp16": False, "gradient_checkpointing": False}),
])  # fmt: skip
def test_device_decides_what_the_flags_leave_open(kind, expected):
    values = {"bf16": None, "fp16": False, "gradient_checkpointing": True, "use_cpu": False}
    fit_to_device(values, ["--output_dir", "x"], kind)
    assert {key: values[key] for key in expected} == expected


def test_fp16_flag_leaves_bf16_to_the_config(tmp_path):
    values = {"bf16": None, "fp16": True, "gradient_checkpointing": True}
    fit_to_device(values, ["--fp16", "True"], "cuda-bf16")
    assert values["bf16"] is None  # trl then sets bf16 = not fp16


def test_sft_without_the_flags_trains_in_float32_without_checkpointing(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "发烧怎么办？", "output": "多喝水。"}] * 2)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="medicalgpt")
    supervised_finetuning.main([
        "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--template_name", "qwen",
        "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "2", "--output_dir", str(out),
        "--report_to", "none", "--disable_tqdm", "True",
    ])  # fmt: skip
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.bf16, args.fp16, args.gradient_checkpointing) == (False, False, False)
    assert (
        "Mixed precision: no autocast (default on CPU; --bf16 / --fp16 True/False to change). "
        "Gradient checkpointing: off (default on CPU; --gradient_checkpointing True to change)."
    ) in caplog.text
