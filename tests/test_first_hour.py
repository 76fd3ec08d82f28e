"""What a new user meets in the first hour: model-path mistakes, re-runs, chained adapters loaded from elsewhere,
run_*.sh model choice, and --help."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from medicalgpt.args import ModelArguments
from medicalgpt.errors import ModelPathError
from tests.helpers import FAST_FLAGS, REPO, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SFT_RECORDS = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(8)]


def sft_argv(model, data, out, *extra):
    return ["--model_name_or_path", model, "--train_file_dir", str(data), "--do_train", "--output_dir", str(out),
            "--per_device_train_batch_size", "2", *FAST_FLAGS, *extra]  # fmt: skip


def one_line_error(result):
    """The stderr line of a clean usage error; fails on a traceback or a non-1 exit status."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# -- (1) model paths: one line naming the flag, the path and what to do, in seconds ------------------------------


@pytest.mark.parametrize(
    "path, says",
    [
        ("models/does-not-exist", "HF_HUB_OFFLINE=1 forbids downloading it"),  # could be a folder or a hub id
        ("/no/such/model", "no such folder (/no/such/model)"),
        ("./outputs-sft-qwen-v2", f"no such folder ({REPO / 'outputs-sft-qwen-v2'})"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "nor a model in the hub cache"),  # a hub id, offline, not cached
        ("~", f"`~` is not expanded here; pass the full path, {os.path.expanduser('~')}."),  # quoted: no shell
    ],
)
def test_training_script_names_the_flag_the_path_and_what_to_do(path, says, tmp_path, monkeypatch):
    import supervised_finetuning

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    start = time.monotonic()
    with pytest.raises(ModelPathError) as error:
        supervised_finetuning.main(sft_argv(path, data, tmp_path / "out"))
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith(f"--model_name_or_path {path}: ") and says in message and "\n" not in message
    assert "pass " in message.lower()  # what to do
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_fails_at_once_without_retries(tiny_model_dir, tmp_path, monkeypatch):
    """Online but no network (a closed port here): one request, no minute of retries."""
    from medicalgpt.serve.chat import ChatArguments, load_chat_engine

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(ModelPathError) as error:
        load_chat_engine(ChatArguments(base_model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert time.monotonic() - start < 5
    assert str(error.value).startswith("--base_model Qwen/Qwen2.5-0.5B-Instruct: ")
    assert "the hub (http://127.0.0.1:9) cannot be reached" in str(error.value) and "HF_ENDPOINT" in str(error.value)


def test_inference_and_training_cli_print_one_line_without_traceback(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    command = [sys.executable, "supervised_finetuning.py", *sft_argv("models/does-not-exist", data, tmp_path / "o")]
    training = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert one_line_error(training).startswith("error: --model_name_or_path models/does-not-exist: neither a folder")
    command = [sys.executable, "inference.py", "--base_model", "/no/such/model", "--interactive"]
    inference = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert one_line_error(inference).startswith("error: --base_model /no/such/model: no such folder")


def test_lora_model_path_is_checked_by_its_own_flag(tiny_model_dir, tmp_path):
    from medicalgpt.serve.chat import ChatArguments, load_chat_engine

    with pytest.raises(ModelPathError, match=r"^--lora_model outputs-sft-typo: neither a folder here"):
        load_chat_engine(ChatArguments(base_model=tiny_model_dir, lora_model="outputs-sft-typo"))


# -- (2) a finished run re-run says it is complete and trains nothing ---------------------------------------------


def rerun(script_main, argv, caplog):
    caplog.clear()
    with pytest.raises(SystemExit) as exit_:
        script_main(argv)
    assert exit_.value.code == 0
    assert "this run is complete" in caplog.text


def test_rerun_of_a_finished_run_exits_0_and_leaves_it_alone(tiny_model_dir, tmp_path, caplog):
    import supervised_finetuning

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    out = tmp_path / "out"
    argv = sft_argv(tiny_model_dir, data, out, "--save_strategy", "steps", "--save_steps", "2", "--use_peft", "True")
    supervised_finetuning.main([*argv, "--max_steps", "2"])
    adapter = (out / "adapter_model.safetensors").read_bytes()
    files = sorted(p.name for p in out.iterdir())
    rerun(supervised_finetuning.main, [*argv, "--max_steps", "2"], caplog)
    assert sorted(p.name for p in out.iterdir()) == files  # no checkpoint-3
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_epoch_budget_rerun_is_complete_until_the_epochs_grow(tiny_model_dir, tmp_path, caplog):
    import supervised_finetuning

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS)
    out = tmp_path / "out"
    argv = sft_argv(tiny_model_dir, data, out, "--save_strategy", "epoch")
    supervised_finetuning.main([*argv, "--num_train_epochs", "1"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    rerun(supervised_finetuning.main, [*argv, "--num_train_epochs", "1"], caplog)
    caplog.clear()
    supervised_finetuning.main([*argv, "--num_train_epochs", "2"])
    assert f"Resuming from {out / 'checkpoint-4'}" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8


# -- (3) chained adapters load from any working directory ---------------------------------------------------------


@pytest.fixture(scope="module")
def chained(sft_adapter_dir, tmp_path_factory):
    """A DPO adapter trained, as the README chains it, on an SFT adapter given by a relative path."""
    import dpo_training

    here = os.getcwd()
    workdir = str(tmp_path_factory.mktemp("chain"))
    shutil.copytree(sft_adapter_dir, os.path.join(workdir, "outputs-sft-qwen-v1"))
    os.chdir(workdir)
    try:
        argv = ["--model_name_or_path", "outputs-sft-qwen-v1", "--train_file_dir", str(REPO / "data" / "reward"),
                "--do_train", "--template_name", "qwen", "--use_peft", "True", "--max_steps", "1",
                "--output_dir", "outputs-dpo-qwen-v1", "--max_train_samples", "4", "--learning_rate", "1e-2",
                *FAST_FLAGS]  # fmt: skip
        dpo_training.main(argv)
    finally:
        os.chdir(here)
    return os.path.join(workdir, "outputs-dpo-qwen-v1")


def adapter_config(path):
    return json.loads((open(os.path.join(path, "adapter_config.json"), encoding="utf-8")).read())


def test_chained_adapter_records_an_absolute_base_and_loads_from_elsewhere(chained, tmp_path, monkeypatch):
    from medicalgpt.model.loader import load_model

    sft_adapter_dir = os.path.join(os.path.dirname(chained), "outputs-sft-qwen-v1")
    assert adapter_config(chained)["base_model_name_or_path"] == sft_adapter_dir
    monkeypatch.chdir(tmp_path)
    model = load_model(ModelArguments(model_name_or_path=chained, torch_dtype="float32"))
    sft = load_model(ModelArguments(model_name_or_path=sft_adapter_dir, torch_dtype="float32"))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, sft.state_dict()[n])]
    assert changed  # the DPO adapter was merged on top of the SFT one


def test_older_relative_base_is_found_beside_the_adapter(chained, sft_adapter_dir, tmp_path, monkeypatch):
    from medicalgpt.model.adapter import read_adapter_base
    from medicalgpt.model.loader import load_model

    copy = tmp_path / "runs" / "outputs-dpo-qwen-v1"
    shutil.copytree(chained, copy)
    shutil.copytree(sft_adapter_dir, tmp_path / "runs" / "outputs-sft-qwen-v1")
    config = adapter_config(copy)
    config["base_model_name_or_path"] = "outputs-sft-qwen-v1"  # as adapters were written before
    (copy / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    assert read_adapter_base(str(copy)) == str(tmp_path / "runs" / "outputs-sft-qwen-v1")
    reference = load_model(ModelArguments(model_name_or_path=chained, torch_dtype="float32")).state_dict()
    loaded = load_model(ModelArguments(model_name_or_path=str(copy), torch_dtype="float32")).state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in reference.items())


def test_moved_base_is_a_clear_error_naming_the_adapter(chained, tmp_path):
    from medicalgpt.model.loader import load_model

    copy = tmp_path / "outputs-dpo-qwen-v1"
    shutil.copytree(chained, copy)
    config = adapter_config(copy)
    config["base_model_name_or_path"] = "/moved/away/outputs-sft-qwen-v1"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError) as error:
        load_model(ModelArguments(model_name_or_path=str(copy)))
    assert str(error.value).startswith(f"{copy / 'adapter_config.json'}: base model /moved/away/outputs-sft-qwen-v1")
    assert "it has moved or been deleted" in str(error.value)


def test_recorded_base_given_again_as_base_is_merged_once(chained):
    """merge_peft_adapter.py's default: --base_model is the adapter's own base, itself an adapter."""
    from medicalgpt.model.loader import load_model, load_model_with_adapter

    sft_adapter_dir = os.path.join(os.path.dirname(chained), "outputs-sft-qwen-v1")
    whole = load_model(ModelArguments(model_name_or_path=chained, torch_dtype="float32")).state_dict()
    model_args = ModelArguments(model_name_or_path=sft_adapter_dir, torch_dtype="float32")
    merged = load_model_with_adapter(model_args, chained).state_dict()
    assert all(torch.equal(merged[name], weight) for name, weight in whole.items())


# -- (4) run_*.sh: an explicit MODEL= wins; a previous stage's output is used only when MODEL is not set ----------


@pytest.fixture
def script_workspace(tmp_path):
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    for script in REPO.glob("run_*.sh"):
        shutil.copy(script, tmp_path / script.name)
    for output in ("merged-pt-qwen-v1", "outputs-sft-qwen-v1", "outputs-rm-qwen-v1"):
        (tmp_path / output).mkdir()
    return tmp_path


def launched(workspace, script, python="true", **env):
    """The command line a run_*.sh would start (PYTHON=true runs nothing), and its other stderr lines."""
    unset = ("MODEL", "REWARD_MODEL", "PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")
    environment = {k: v for k, v in ENV.items() if k not in unset} | ({"PYTHON": python} if python else {})
    result = subprocess.run(["sh", script], cwd=workspace, env={**environment, **env}, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    command = next(line for line in result.stderr.splitlines() if line.startswith("+ "))[2:]
    return command.split(), [line for line in result.stderr.splitlines() if not line.startswith("+ ")]


def flag_value(command, flag):
    return command[command.index(flag) + 1]


def test_run_sft_explicit_model_wins_over_a_merged_pt_model(script_workspace):
    command, notes = launched(script_workspace, "run_sft.sh", MODEL="Qwen/Qwen2.5-1.5B-Instruct")
    assert flag_value(command, "--model_name_or_path") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert notes == []
    command, notes = launched(script_workspace, "run_sft.sh")
    assert flag_value(command, "--model_name_or_path") == "merged-pt-qwen-v1"
    assert notes == ["run_sft.sh: MODEL is not set: using the previous stage's output merged-pt-qwen-v1 "
                     "(set MODEL=... to choose another model)"]  # fmt: skip


@pytest.mark.parametrize("script", ["run_rm.sh", "run_dpo.sh"])
def test_run_stage_explicit_model_wins_over_the_sft_output(script, script_workspace):
    command, _ = launched(script_workspace, script, MODEL="my-model")
    assert flag_value(command, "--model_name_or_path") == "my-model"
    command, notes = launched(script_workspace, script)
    assert flag_value(command, "--model_name_or_path") == "outputs-sft-qwen-v1" and len(notes) == 1


def test_run_scripts_use_the_project_venv_when_no_environment_is_active(script_workspace):
    venv_python = script_workspace / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\nexit 0\n")
    venv_python.chmod(0o755)
    command, _ = launched(script_workspace, "run_sft.sh", python=None)
    assert command[:2] == [".venv/bin/python", "supervised_finetuning.py"]
    active = script_workspace / "active-env"
    active.mkdir()
    shutil.copy(venv_python, active / "python")
    path = f"{active}:{os.environ['PATH']}"
    command, _ = launched(script_workspace, "run_sft.sh", python=None, VIRTUAL_ENV=str(active), PATH=path)
    assert command[0] == "python"  # an activated environment's python is used as it is


def test_run_ppo_policy_and_reward_model_each_have_their_explicit_override(script_workspace):
    command, notes = launched(script_workspace, "run_ppo.sh", MODEL="policy", REWARD_MODEL="judge")
    assert (flag_value(command, "--sft_model_path"), flag_value(command, "--reward_model_path")) == ("policy", "judge")
    assert notes == []
    command, notes = launched(script_workspace, "run_ppo.sh", MODEL="policy")
    assert flag_value(command, "--reward_model_path") == "outputs-rm-qwen-v1"
    assert notes[0].startswith("run_ppo.sh: REWARD_MODEL is not set: using the previous stage's output")


# -- --help that reads ---------------------------------------------------------------------------------------------

SCRIPTS = ["pretraining.py", "supervised_finetuning.py", "reward_modeling.py", "ppo_training.py", "dpo_training.py",
           "orpo_training.py", "inference.py", "merge_peft_adapter.py", "gradio_demo.py", "fastapi_server_demo.py",
           "evaluate.py", "validate_jsonl.py", "convert_dataset.py", "build_domain_tokenizer.py", "kto_training.py",
           "cpo_training.py"]  # fmt: skip


def help_of(script, capsys):
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    return module.__doc__, capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_docstring_as_written_a_short_usage_and_one_default(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script])
    doc, text = help_of(script, capsys)
    usage = text.split("\n\n")[0]
    assert usage.startswith(f"usage: {script}") and len(usage.splitlines()) <= 8  # the training scripts had 180
    example = next(line for line in doc.splitlines() if line.strip().startswith("python "))
    assert example in text.splitlines()  # the examples keep their line breaks and indentation
    for block in option_blocks(text):
        assert block.count("(default:") <= 1, block


def option_blocks(text):
    """Each option's help, its continuation lines joined."""
    blocks = []
    for line in text.splitlines():
        if line.startswith("  -"):
            blocks.append(line)
        elif blocks and line.startswith("      "):
            blocks[-1] += " " + line.strip()
    return blocks


def test_training_help_lists_our_options_before_the_trainers_and_each_spelling_once(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["supervised_finetuning.py"])
    _, text = help_of("supervised_finetuning.py", capsys)
    assert text.startswith("usage: supervised_finetuning.py [run.yaml] [--option VALUE ...]\n\nStage 2: ")
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections[1:4] == ["model:", "data:", "LoRA / QLoRA:"]
    assert sections[-2].startswith("training (SupervisedConfig")
    assert sections[-1] == "upstream flags, accepted for compatibility:"
    assert "  --model_name_or_path VALUE " in text and "--model-name-or-path" not in text
    assert "(default: none). (default: None)" not in text


# -- one behaviour on context overflow (terminal and browser), multi-line paste -----------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir):
    from tests.helpers import qa_engine

    return qa_engine(tmp_path_factory, tiny_model_dir)


class Seen:
    """An engine wrapper that records the conversations it is asked to continue."""

    def __init__(self, engine):
        self.engine, self.conversations = engine, []

    def stream(self, messages, options):
        self.conversations.append(messages)
        return self.engine.stream(messages, options)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_gradio_drops_the_oldest_exchange_says_so_and_keeps_the_chat(engine):
    from gradio_demo import respond
    from medicalgpt.serve.chat import GenerationOptions

    options = GenerationOptions(temperature=0, max_new_tokens=30)
    long_question = "发烧 " * 1000  # ~3000 tokens of a 4096-token context
    history = [{"role": "user", "content": long_question}, {"role": "assistant", "content": "多喝水。"}]
    seen, notes = Seen(engine), []
    answers = list(respond(seen, options, long_question, history, notes.append))
    assert seen.conversations == [[{"role": "user", "content": long_question}]]
    assert notes == [f"The conversation no longer fits the model's context of {engine.context_length} tokens: its "
                     "oldest exchange is left out of what the model sees."]  # fmt: skip
    assert answers and answers[-1] == "".join(engine.stream(seen.conversations[0], options))

    notes.clear()
    assert list(respond(seen, options, long_question * 2, history, notes.append)) == []  # no answer, no exception
    assert len(seen.conversations) == 1 and notes[0].endswith("Shorten the message.")


def test_gradio_history_leaves_out_a_question_that_got_no_answer():
    from gradio_demo import history_messages

    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "too long"}, {"role": "user", "content": [{"type": "text", "text": "q2"}]},
               {"role": "assistant", "content": "a2"}]  # fmt: skip
    kept = [(m["role"], m["content"]) for m in history_messages(history)]
    assert kept == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


def test_lines_pasted_into_the_terminal_are_one_message():
    """On a real pseudo-terminal: three lines arrive at once (a paste), then a line typed later."""
    import pty

    from inference import input_is_pending, read_message

    master, slave = pty.openpty()
    terminal = open(slave, encoding="utf-8")
    try:
        os.write(master, "头痛三天\n伴有发热\n怎么办？\n".encode())

        def read(prompt):
            line = terminal.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")

        pending = lambda: input_is_pending(terminal)  # noqa: E731
        assert read_message(read, pending) == "头痛三天\n伴有发热\n怎么办？"
        os.write(master, b"next\n")
        assert read_message(read, pending) == "next"
    finally:
        terminal.close()
        os.close(master)


def test_a_triple_quote_block_is_one_message_and_piped_lines_stay_separate():
    from inference import read_message

    lines = iter(['"""', "第一行", "", "第三行", '"""'])
    assert read_message(lambda prompt: next(lines), pending=lambda: False) == "第一行\n\n第三行"
    lines = iter(["one", "two"])
    assert read_message(lambda prompt: next(lines), pending=lambda: False) == "one"


# -- vllm_deployment.sh ---------------------------------------------------------------------------------------------


def test_vllm_dry_run_leaves_the_api_key_for_the_readers_shell():
    env = {**ENV, "DRY_RUN": "1", "VLLM_API_KEY": "secret"}
    result = subprocess.run(["sh", "vllm_deployment.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    curl = result.stdout.splitlines()[-1]
    assert '-H "Authorization: Bearer ${VLLM_API_KEY:-EMPTY}"' in curl and "secret" not in curl
    expanded = subprocess.run(["sh", "-c", f"set -- {curl}; for a; do echo \"$a\"; done"], env=env,
                              capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    assert "Authorization: Bearer secret" in expanded  # pasted into a shell, the key is filled in


def test_vllm_script_without_vllm_says_how_to_install_it():
    env = {**ENV, "PYTHON": sys.executable, "PORT": "9", "HEALTH_TIMEOUT": "30"}
    result = subprocess.run(["sh", "vllm_deployment.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert f"vLLM is not installed for {sys.executable}: pip install vllm (on a CUDA GPU machine" in result.stderr
