"""The recipes in examples/: each one parses against its script's own arguments, and the run_*.sh that read them
start the tutorial's command (the flags live in one place: the YAML)."""

import dataclasses
import importlib
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import ENV, REPO

SCRIPTS = {"pt": "pretraining", "sft": "supervised_finetuning", "rm": "reward_modeling", "ppo": "ppo_training",
           "dpo": "dpo_training", "orpo": "orpo_training", "distill": "distill_training", "kto": "kto_training",
           "cpo": "cpo_training"}  # fmt: skip
EXAMPLES = sorted(path.name for path in (REPO / "examples").glob("*.yaml"))
# What each example needs beside its file: the model, data and output folders the run_*.sh give
REQUIRED = {"ppo": ["--sft_model_path", "m", "--reward_model_path", "r"],
            "distill": ["--model_name_or_path", "m", "--teacher_model_name_or_path", "t"]}  # fmt: skip


class Parsed(Exception):
    """Raised with a script's parsed arguments, so that main() stops right after parsing."""


def parsed_by(script, argv, monkeypatch):
    """The arguments `script`'s main() parses from `argv`, with the script's own parse_args call (its dataclasses,
    its config class); nothing after the parse runs."""
    module = importlib.import_module(script)
    parse_args = module.parse_args

    def stop_after(*types, **kwargs):
        raise Parsed(parse_args(*types, **kwargs))

    monkeypatch.setattr(module, "parse_args", stop_after)
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    return parsed.value.args[0]


def values(parsed):
    """Every option of every parsed group, one flat dict (the trainer config's own to_dict)."""
    flat = {}
    for group in parsed:
        flat.update(group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group))
        if hasattr(group, "overwrite_output_dir"):  # a legacy flag the parser sets on the config (not a field)
            flat["overwrite_output_dir"] = group.overwrite_output_dir
    return flat


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_parses_against_its_script(example, tmp_path, monkeypatch):
    stage = example.split("_")[0]
    config = yaml.safe_load((REPO / "examples" / example).read_text())
    argv = [f"examples/{example}", "--output_dir", str(tmp_path), *REQUIRED.get(stage, ["--model_name_or_path", "m"])]
    monkeypatch.chdir(REPO)
    parsed = values(parsed_by(SCRIPTS[stage], argv, monkeypatch))
    for key, value in config.items():
        got = parsed[ALIASES.get(key, key)]
        value = "group_by_length" if key == "group_by_length" else value
        assert same(got, value), (example, key, got, value)


# Where the parser puts an example's key (medicalgpt/parser.py: legacy flags and current names)
ALIASES = {"warmup_ratio": "warmup_steps", "group_by_length": "train_sampling_strategy",
           "gradient_checkpointing": "activation_checkpointing"}  # fmt: skip


def same(parsed, written):
    """A parsed value is what the YAML wrote (`2e-4` is a string to YAML, a float once parsed; report_to a list)."""
    if isinstance(parsed, list):
        return parsed == [written] or parsed == written
    if isinstance(parsed, bool) or isinstance(written, bool):
        return parsed == written
    if isinstance(parsed, int | float):
        return float(parsed) == float(written)
    return str(parsed) == str(written)


def test_examples_cover_every_stage_script():
    assert {name.split("_")[0] for name in EXAMPLES} == set(SCRIPTS)


def launched_command(script, tmp_path, **env):
    """The command line `script` (a run_*.sh) starts, PYTHON=true running nothing."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copy(REPO / script, tmp_path)
    environment = {k: v for k, v in ENV.items() if k not in ("MODEL", "PYTHON")} | {"PYTHON": "true", **env}
    result = subprocess.run(["sh", script], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stderr.splitlines() if line.startswith("+ "))[2:].split()


# The tutorial's SFT command as it is written (only the model path shortened)
TUTORIAL_SFT = """--model_name_or_path m --train_file_dir ./data/finetune --validation_file_dir ./data/finetune
    --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --do_train --do_eval --template_name qwen
    --use_peft True --max_train_samples 1000 --max_eval_samples 10 --model_max_length 4096 --num_train_epochs 1
    --learning_rate 2e-5 --warmup_ratio 0.05 --weight_decay 0.05 --logging_strategy steps --logging_steps 10
    --eval_steps 50 --eval_strategy steps --save_steps 500 --save_strategy steps --save_total_limit 13
    --gradient_accumulation_steps 8 --preprocessing_num_workers 4 --output_dir outputs-sft-qwen-v1
    --overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --target_modules all --lora_rank 8
    --lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 --device_map auto --report_to tensorboard
    --ddp_find_unused_parameters False --gradient_checkpointing True --cache_dir ./cache --flash_attn True"""


def test_run_sft_starts_the_tutorial_command(tmp_path, monkeypatch):
    """run_sft.sh (flags from examples/sft_lora.yaml) and the tutorial's SFT command parse to the same arguments."""
    command = launched_command("run_sft.sh", tmp_path, MODEL="m", EXTRA_ARGS="--max_steps 2")
    assert command[:3] == ["true", "supervised_finetuning.py", "examples/sft_lora.yaml"]
    monkeypatch.chdir(tmp_path)
    from_script = values(parsed_by("supervised_finetuning", command[2:], monkeypatch))
    tutorial = [*TUTORIAL_SFT.split(), "--max_steps", "2"]
    from_tutorial = values(parsed_by("supervised_finetuning", tutorial, monkeypatch))
    assert from_script == from_tutorial
