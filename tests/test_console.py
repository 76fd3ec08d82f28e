"""What a person reads: a mistake is one line before anything else, a run starts with a short summary (the rest in
run_args.json), the libraries' notices about packages nobody asked for are held back, and --verbose shows them."""

import ast
import importlib
import json
import re
import subprocess
import sys
import warnings

import pytest

from tests.helpers import ENV, REPO, run, write_jsonl

NOISE = ("gemm_4bit_forward", "FutureWarning", "Setting accelerator to CPU", "LOAD REPORT", "Training arguments")


def console_lines(command, returncode=0):
    """The lines a terminal shows (stdout and stderr as written; a progress bar redrawn with \\r is one line)."""
    result = subprocess.run(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == returncode, result.stdout[-3000:]
    return result.stdout.rstrip("\n").split("\n")


def test_a_mistyped_model_path_is_the_only_line_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "nowhere", "--train_file_dir", "data/finetune", "--output_dir", str(out)]
    lines = console_lines([sys.executable, "supervised_finetuning.py", *argv], returncode=1)
    assert len(lines) <= 5, lines
    assert lines[-1].startswith("error: --model_name_or_path nowhere: neither a folder here")
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_verbose_shows_the_held_notices_again(tmp_path):
    """peft imports bitsandbytes, which says it lacks a CPU kernel: held back, shown with --verbose. When a library
    stops saying it, this test fails: the entry in medicalgpt/console.py HELD_NOTICES can go."""
    argv = ["--model_name_or_path", "nowhere", "--train_file_dir", "data/finetune", "--output_dir", str(tmp_path)]
    result = run([sys.executable, "supervised_finetuning.py", *argv, "--verbose"])
    assert result.returncode == 1
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in result.stderr


@pytest.mark.parametrize(
    "script, data",
    [("pretraining", "data/pretrain"), ("reward_modeling", "data/reward"), ("dpo_training", "data/reward"),
     ("orpo_training", "data/reward"), ("ppo_training", "data/finetune"), ("distill_training", "data/finetune")],
)  # fmt: skip
def test_every_stage_checks_the_model_path_before_printing_anything(script, data, tmp_path, capfd, monkeypatch):
    from medicalgpt.errors import ModelPathError

    main = importlib.import_module(script).main
    flag = "--sft_model_path" if script == "ppo_training" else "--model_name_or_path"
    argv = [flag, "nowhere", "--train_file_dir", data, "--output_dir", str(tmp_path / "out"), "--do_train"]
    argv += ["--reward_model_path", "nowhere"] if script == "ppo_training" else []
    argv += ["--teacher_model_name_or_path", "nowhere"] if script == "distill_training" else []
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])  # the error names the flag as typed
    capfd.readouterr()
    with pytest.raises(ModelPathError, match=f"^{flag} nowhere: "):
        main(argv)
    printed = capfd.readouterr()
    assert printed.out + printed.err == ""
    assert not (tmp_path / "out").exists()


def test_a_tiny_sft_run_prints_its_summary_before_the_progress_bar(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": "回答" * i} for i in range(1, 5)]
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--template_name", "qwen",
            "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_peft", "True",
            "--output_dir", str(out), "--report_to", "none", "--packing", "False"]  # fmt: skip
    lines = console_lines([sys.executable, "supervised_finetuning.py", *argv])
    bar = next(i for i, line in enumerate(lines) if re.match(r"\s*0%\|.*\| 0/1 \[", line))
    assert bar <= 25, lines[:bar]
    assert not [line for line in lines[:bar] if any(noise in line for noise in NOISE)]
    start = next(i for i, line in enumerate(lines) if " INFO medicalgpt: supervised_finetuning.py: " in line)
    summary = lines[start : start + 8]
    assert summary[0].endswith(f"INFO medicalgpt: supervised_finetuning.py: {tiny_model_dir} -> {out}")
    assert [line.split()[0] for line in summary[1:]] == ["model", "method", "data", "batch", "steps", "precision",
                                                         "arguments"]  # fmt: skip
    recorded = json.loads((out / "run_args.json").read_text())
    arguments = recorded["arguments"]
    assert recorded["script"] == "supervised_finetuning.py" and recorded["versions"]["trl"].startswith("1.")
    assert arguments["ModelArguments"]["model_name_or_path"] == tiny_model_dir
    assert (arguments["LoraArguments"]["use_peft"], arguments["LoraArguments"]["lora_rank"]) == (True, 8)
    assert (arguments["SupervisedConfig"]["max_steps"], arguments["SupervisedConfig"]["bf16"]) == (1, False)
    total = sum(len(ids) for ids in tokenised_rows(tiny_model_dir, data))
    assert summary[1].strip().startswith("model      Qwen2ForCausalLM, ") and summary[1].endswith(" float32")
    assert "LoRA r=8, alpha=16 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in summary[2]
    assert summary[3].strip() == f"data       4 rows for training; {total / 4:,.0f} tokens a row on average"
    batch = "batch      2 rows per device x 1 process(es) x 1 accumulation = 2 rows a step"
    assert summary[4].strip() == f"{batch}, ~{round(total / 2):,} tokens a step"
    assert summary[5].strip() == "steps      1 (--max_steps)"
    assert summary[7].strip() == f"arguments  {out / 'run_args.json'} (--verbose logs them too)"


def tokenised_rows(model_dir, data):
    """The token ids SFT trains on for `data` (as tokenised by the script)."""
    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_tokenizer
    from medicalgpt.processors.sft import prepare_sft_dataset
    from medicalgpt.templates import build_template
    from medicalgpt.train.records import load_file_records

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=model_dir))
    records = load_file_records([str(data)], "sft")
    template = build_template("qwen", tokenizer)
    dataset = prepare_sft_dataset(records, template=template, tokenizer=tokenizer, max_length=1024, num_proc=1)
    return dataset["input_ids"]


@pytest.mark.parametrize("config", ["SFTConfig", "TrainingArguments"])
@pytest.mark.parametrize("flags", [[], ["--gradient_checkpointing", "True"], ["--activation_checkpointing", "True"]])
def test_the_tutorial_checkpointing_flag_is_passed_by_its_current_name(config, flags, tmp_path):
    import transformers
    import trl

    from medicalgpt.parser import parse_args

    config_class = getattr(trl, config, None) or getattr(transformers, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (args,) = parse_args(config_class, argv=["--output_dir", str(tmp_path), *flags])
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    on = bool(flags)  # on the CPU it is off unless a flag asks for it (medicalgpt/device.py)
    assert (args.activation_checkpointing, args.gradient_checkpointing) == (on, on)
    assert args.activation_checkpointing_kwargs == ({"use_reentrant": False} if on else None)


def test_a_new_reward_head_report_is_held_and_any_other_report_is_shown():
    from medicalgpt.console import _new_reward_head_only

    head = "\x1b[1mQwen2ForSequenceClassification LOAD REPORT\x1b[0m from: m\nKey          | Status  | \n"
    rule = "-------------+---------+-\n"
    assert _new_reward_head_only(head + rule + "score.weight | MISSING | \n\nNotes:\n- MISSING: newly initialized")
    assert not _new_reward_head_only(head + rule + "score.weight | MISSING | \nlm_head.weight | UNEXPECTED | \n")
    assert not _new_reward_head_only(head.replace("Sequence", "Token") + rule + "score.weight | MISSING | \n")


def test_loading_a_reward_model_from_a_causal_lm_reports_nothing(tiny_model_dir, capfd):
    from transformers import AutoModelForSequenceClassification

    from medicalgpt import console

    console.set_verbose(False)
    held = len(console._held)
    capfd.readouterr()
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err
    assert "score.weight" in console._held[held].getMessage()  # transformers still reports it: the filter matters


def test_every_script_imports_the_package_before_any_library():
    """The package's __init__ installs the console's filters: it must load before transformers, trl, peft, ..."""
    for script in sorted(REPO.glob("*.py")):
        body = ast.parse(script.read_text()).body
        imports = [
            n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
            for n in body
            if isinstance(n, ast.Import | ast.ImportFrom)
        ]
        first = next((name for name in imports if name.split(".")[0] not in sys.stdlib_module_names), None)
        assert first is None or first.split(".")[0] in ("medicalgpt", "template"), (script.name, first)
