"""Several processes train like one: the same LR curve under torchrun as in one process with the same global batch;
atomic checkpoints that keep --load_best_model_at_end and --save_total_limit working; where the weights go under
DeepSpeed ZeRO-3 and FSDP; which errors are the user's."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import dpo_training
import supervised_finetuning
from medicalgpt.model.loader import resolve_device_map
from tests.helpers import FAST_FLAGS, TORCHRUN, deepspeed_run, lora_b_max, needs_deepspeed, run, write_jsonl


def learning_rates(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["learning_rate"] for entry in history if "learning_rate" in entry]


def sft_argv(model, data, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file_dir", str(data), "--template_name", "qwen", "--do_train",
            "--packing", "False", "--output_dir", str(output_dir), "--logging_steps", "1", *FAST_FLAGS,
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    records = [{"instruction": f"问题{i}：发烧怎么办？", "output": f"回答{i}：多休息，多喝水。"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("scaleout") / "sft.jsonl", records)


def test_sft_lr_curve_under_torchrun_equals_one_process(tiny_model_dir, sft_data, tmp_path):
    """1 x 4 and 2 x 2 examples per step: the same 4 optimizer steps and the same LR at each."""
    flags = ["--num_train_epochs", "1", "--learning_rate", "1e-3", "--save_strategy", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    supervised_finetuning.main(sft_argv(tiny_model_dir, sft_data, one, *flags, "--per_device_train_batch_size", "4"))
    argv = sft_argv(tiny_model_dir, sft_data, two, *flags, "--per_device_train_batch_size", "2")
    result = run([*TORCHRUN, "--master_port", "29731", "supervised_finetuning.py", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert learning_rates(one) == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert learning_rates(two) == learning_rates(one)


@pytest.mark.multiprocess
def test_streaming_sft_under_torchrun_trains_like_one_process(tiny_model_dir, sft_data, tmp_path):
    """--streaming over 2 processes x 2 examples and one process x 4: every rank reads the one stream and keeps its
    slice of each global batch (trl's dispatch_batches=False; accelerate's IterableDatasetShard), so no two ranks
    train on the same record and after 4 steps the weights equal one process's to float rounding, far from the
    initial ones. Ranks each training on the whole stream would train on records 0-1 twice where one process trains
    on 0-3. (Several files: tests/train/test_streaming.py.)"""
    from transformers import AutoModelForCausalLM

    flags = ["--streaming", "True", "--max_steps", "4", "--learning_rate", "1e-2", "--save_strategy", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    supervised_finetuning.main(sft_argv(tiny_model_dir, sft_data, one, *flags, "--per_device_train_batch_size", "4"))
    argv = sft_argv(tiny_model_dir, sft_data, two, *flags, "--per_device_train_batch_size", "2")
    result = run([*TORCHRUN, "--master_port", "29733", "supervised_finetuning.py", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    reference, parallel = (AutoModelForCausalLM.from_pretrained(out).state_dict() for out in (one, two))
    for name, weight in reference.items():
        torch.testing.assert_close(parallel[name], weight, atol=1e-4, rtol=0)
    assert max((reference[name] - initial[name]).abs().max() for name in initial) > 1e-2


def test_dpo_lr_curve_under_torchrun_equals_one_process(tiny_model_dir, tmp_path):
    pairs = [{"prompt": f"问题{i}", "chosen": "请去看医生。", "rejected": "多喝热水。"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--template_name", "qwen",
              "--do_train", "--num_train_epochs", "1", "--learning_rate", "1e-3", "--save_strategy", "no",
              "--logging_steps", "1", "--use_peft", "True", *FAST_FLAGS]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    dpo_training.main([*common, "--per_device_train_batch_size", "2", "--output_dir", str(one)])
    argv = [*common, "--per_device_train_batch_size", "1", "--output_dir", str(two)]
    result = run([*TORCHRUN, "--master_port", "29732", "dpo_training.py", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert learning_rates(one) == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert learning_rates(two) == learning_rates(one)


def test_load_best_model_at_end_keeps_the_best_checkpoint_under_save_total_limit_1(tiny_model_dir, sft_data, tmp_path):
    """Evaluated and saved every step while the loss falls; `--greater_is_better True` makes the highest eval_loss
    the best, so the best checkpoint is the first one, not the last: its weights must end in output_dir and its
    checkpoint must survive the rotation."""
    out = tmp_path / "out"
    supervised_finetuning.main(sft_argv(
        tiny_model_dir, sft_data, out, "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--do_eval", "--validation_split_percentage", "25", "--eval_strategy", "steps",
        "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end", "True",
        "--metric_for_best_model", "eval_loss", "--greater_is_better", "True", "--save_total_limit", "1",
    ))  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert eval_losses[0] == max(eval_losses) and eval_losses[-1] < eval_losses[0], eval_losses
    assert state["best_model_checkpoint"] == str(out / "checkpoint-1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not list((out / ".partial").glob("checkpoint-*")), "nothing left in the staging folder"
    final, best = load_file(out / "model.safetensors"), load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(final[name], best[name]) for name in best)
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["best_model_checkpoint"] == str(
        out / "checkpoint-1"
    ), "the checkpoint's own state names the final folder, not the staging one"


@pytest.fixture
def on_cuda(monkeypatch):
    """resolve_device_map as it runs on a GPU machine, with the launcher's environment cleared."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_device_map_data_parallel_ranks_each_take_their_gpu(on_cuda):
    assert resolve_device_map("auto") == "auto"
    on_cuda.setenv("WORLD_SIZE", "2")
    on_cuda.setenv("LOCAL_RANK", "1")
    assert resolve_device_map("auto") == {"": 1}


def test_device_map_is_left_to_deepspeed_zero3(on_cuda):
    """What transformers reports under ZeRO-2 and ZeRO-3 (runs without DeepSpeed installed)."""
    import transformers.integrations

    on_cuda.setenv("WORLD_SIZE", "2")
    on_cuda.setenv("LOCAL_RANK", "1")
    on_cuda.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: False)
    assert resolve_device_map(None) == {"": 1}
    on_cuda.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    assert resolve_device_map(None) is None
    assert resolve_device_map("auto") is None


def test_device_map_reads_a_real_deepspeed_zero3_config(on_cuda):
    """The same through the config object the Trainer builds from --deepspeed (needs DeepSpeed installed)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install-deepspeed)")
    from transformers.integrations import HfDeepSpeedConfig

    on_cuda.setenv("WORLD_SIZE", "2")
    on_cuda.setenv("LOCAL_RANK", "1")
    zero2 = HfDeepSpeedConfig({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1})
    assert resolve_device_map(None) == {"": 1}
    del zero2
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    assert resolve_device_map(None) is None
    assert resolve_device_map("auto") is None


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"])
def test_device_map_is_left_to_fsdp(on_cuda, variable):
    """`accelerate launch` with an FSDP config sets the first, `--fsdp` the second (transformers 5.23)."""
    on_cuda.setenv("WORLD_SIZE", "2")
    on_cuda.setenv("LOCAL_RANK", "1")
    on_cuda.setenv(variable, "true")
    assert resolve_device_map("auto") is None


def test_fsdp_flag_sets_the_variable_the_device_map_reads(monkeypatch, tmp_path):
    """The contract test_device_map_is_left_to_fsdp relies on: TrainingArguments(--fsdp) sets it."""
    from transformers import TrainingArguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "")  # recorded, so that the test's value is undone
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING")
    TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard auto_wrap", use_cpu=True, report_to=[])
    assert "FSDP_CPU_RAM_EFFICIENT_LOADING" in os.environ


def test_run_cli_reports_the_users_mistakes_on_one_line(tiny_model_dir, tmp_path, capsys):
    from medicalgpt.cli import run_cli
    from medicalgpt.errors import UsageError

    missing = tmp_path / "no-such-data"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(missing), "--do_train"]
    argv += ["--output_dir", str(tmp_path / "out"), *FAST_FLAGS]
    assert run_cli(lambda: supervised_finetuning.main(argv)) == 1
    assert capsys.readouterr().err == f"error: {missing}: no such file or directory\n"
    assert not (tmp_path / "out").exists()

    def bad_flags():
        raise UsageError("--foo and --bar cannot be used together")

    assert run_cli(bad_flags) == 1
    assert capsys.readouterr().err == "error: --foo and --bar cannot be used together\n"


def test_run_cli_keeps_the_traceback_of_internal_errors(tmp_path):
    """A FileNotFoundError the program causes itself (a checkpoint it just wrote and lost, say) is a bug."""
    from medicalgpt.cli import run_cli

    def lost_checkpoint():
        open(tmp_path / "checkpoint-3" / "trainer_state.json")

    with pytest.raises(FileNotFoundError):
        run_cli(lost_checkpoint)


@pytest.mark.multiprocess
@needs_deepspeed
def test_deepspeed_zero3_sft_trains_like_one_process(tiny_model_dir, sft_data, tmp_path):
    """ZeRO-3 over 2 processes x 2 examples and one process x 4: the same LR curve and, gathered into a normal HF
    folder on save, the same weights (to float rounding: 1.7e-5 seen), far from the initial ones. (ZeRO-2 gives the
    same, within 5e-8 of ZeRO-3's weights; left out to keep the suite short.)"""
    from transformers import AutoModelForCausalLM

    flags = ["--num_train_epochs", "1", "--learning_rate", "1e-2", "--save_strategy", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    supervised_finetuning.main(sft_argv(tiny_model_dir, sft_data, one, *flags, "--per_device_train_batch_size", "4"))
    argv = sft_argv(tiny_model_dir, sft_data, two, *flags, "--per_device_train_batch_size", "2")
    result = deepspeed_run("supervised_finetuning.py", argv, 29741)
    assert result.returncode == 0, result.stderr[-3000:]
    assert learning_rates(two) == learning_rates(one) == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    reference, sharded = (AutoModelForCausalLM.from_pretrained(out).state_dict() for out in (one, two))
    for name, weight in reference.items():
        torch.testing.assert_close(sharded[name], weight, atol=1e-4, rtol=0)  # Adam's steps: ~1e-2 each
    assert max((reference[name] - initial[name]).abs().max() for name in initial) > 1e-2


@pytest.mark.multiprocess
@needs_deepspeed
def test_deepspeed_zero3_ppo_saves_every_ranks_optimizer_shard_and_resumes(tiny_model_dir, tmp_path):
    """PPO on accelerate's DeepSpeed plugin: generation from gathered weights, the same LR per update as one process,
    each rank's optimizer shard in the checkpoint, and a resume that continues from it."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"{q}怎么办？", "output": "请去看医生。"}
                                                    for q in ("头痛", "咳嗽", "发烧", "胃痛")])  # fmt: skip
    out = tmp_path / "ppo"
    argv = ["--sft_model_path", tiny_model_dir, "--reward_model_path", tiny_model_dir, "--template_name", "qwen",
            "--train_file_dir", str(data), "--do_train", "--use_peft", "True", "--response_length", "8",
            "--per_device_train_batch_size", "2", "--num_ppo_epochs", "1", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out),
            "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none"]  # fmt: skip
    result = deepspeed_run("ppo_training.py", [*argv, "--total_episodes", "8"], 29745)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["lr"] for entry in history] == [5e-4, 0.0]  # 2 updates of 4 prompts, 1 optimizer step each
    shards = sorted(p.name for p in (out / "checkpoint-2" / "deepspeed" / "global_step2").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert lora_b_max(out) > 1e-4, "the policy adapter, gathered on save, trained"
    resume = ["--total_episodes", "12", "--resume_from_checkpoint", str(out / "checkpoint-2")]
    result = deepspeed_run("ppo_training.py", [*argv, *resume], 29746)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stderr and "(update 2 of 3)" in result.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("flag", [["--fsdp", "full_shard auto_wrap"], ["--deepspeed", "configs/ds_zero3.json"]])
def test_sharding_on_cpu_processes_is_a_usage_error_not_silent_ddp(flag, tiny_model_dir, sft_data, tmp_path, capsys):
    """accelerate 1.15 sets FSDP and DeepSpeed up only on accelerator devices: on CPU processes a run with them
    would train plain DDP (FSDP) or fail after a ZeRO-3-partitioned load (DeepSpeed)."""
    from medicalgpt.cli import run_cli

    if flag[0] == "--deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    argv = sft_argv(tiny_model_dir, sft_data, tmp_path / "out", "--max_steps", "1", *flag)
    try:
        assert run_cli(lambda: supervised_finetuning.main(argv)) == 1
    finally:
        unset_hf_deepspeed_config()  # the parsed --deepspeed config would make later loads in this process ZeRO-3
    error = capsys.readouterr().err
    assert error.startswith(f"error: {flag[0]} (or an accelerate config that asks for it) needs GPUs")
    assert not (tmp_path / "out").exists()
