"""The scripts as a user runs them: real processes, exit codes, torchrun data parallel, resuming."""

import math
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ENV, FAST_FLAGS, REPO, global_step, run, write_jsonl


def test_malformed_sft_file_fails_with_file_and_line_before_anything_is_written(tiny_model_dir, tmp_path):
    data = tmp_path / "finetune"
    data.mkdir()
    (data / "bad.jsonl").write_text(
        '{"instruction": "发烧怎么办", "output": "多喝水"}\n'
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}\n'
        "{not json}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train"]
    result = run([sys.executable, "supervised_finetuning.py", *argv, "--output_dir", str(out), *FAST_FLAGS])
    assert result.returncode == 1
    assert f"{data / 'bad.jsonl'}:2: error: conversations[1].from: unknown role 'bot'" in result.stderr
    assert f"{data / 'bad.jsonl'}:3: error: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()

    validator = run([sys.executable, "validate_jsonl.py", str(data)])
    assert validator.returncode == 1
    assert f"{data / 'bad.jsonl'}:2: error: conversations[1].from: unknown role 'bot'" in validator.stdout


def test_skip_invalid_examples_trains_on_the_rest(tiny_model_dir, tmp_path):
    import supervised_finetuning

    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"instruction": "头痛怎么办？", "output": "注意休息。"}, {"instruction": "no answer", "output": 3}] * 2,
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--max_steps", "1"]
    supervised_finetuning.main([*argv, "--skip_invalid_examples", "True", "--output_dir", str(out), *FAST_FLAGS])
    assert global_step(out) == 1


@pytest.mark.parametrize("script", ["pretraining.py", "supervised_finetuning.py"])
def test_torchrun_two_processes_halve_the_optimizer_steps(script, tiny_model_dir, tmp_path):
    if script == "pretraining.py":
        data = tmp_path / "pt.txt"
        data.write_text("\n".join(f"第{i}段：感冒时注意休息，多喝温水。" * 3 for i in range(16)), encoding="utf-8")
        extra = ["--block_size", "32"]
    else:
        data = write_jsonl(
            tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(16)]
        )
        extra = ["--template_name", "qwen"]
    steps = {}
    for nproc in (1, 2):
        out = tmp_path / f"out-{nproc}"
        argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", *extra]
        argv += ["--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--output_dir", str(out)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        result = run(
            [*launcher, "--master_port", str(29500 + nproc), script, *argv, "--save_strategy", "no", *FAST_FLAGS]
        )
        assert result.returncode == 0, result.stderr[-3000:]
        steps[nproc] = global_step(out)
    # Ranks that each trained alone would take as many steps as one process: halving proves one DDP group.
    assert steps[1] >= 4 and steps[2] == math.ceil(steps[1] / 2)


def test_end_training_frees_ddp_reducers_before_leaving_the_process_group(tmp_path):
    """A reducer freed after the group is destroyed joins gloo's threads with the GIL held and can hang torchrun."""
    import types

    import torch
    import torch.distributed as dist

    from medicalgpt.train.run import end_training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    ddp(torch.ones(3, 2)).sum().backward()
    end_training(types.SimpleNamespace(wait_for_everyone=dist.barrier, end_training=dist.destroy_process_group), ddp)
    assert not hasattr(ddp, "reducer") and not hasattr(ddp, "logger")
    assert not dist.is_initialized()


def _end_training_on_rank(rank, store, stamps):
    import time
    import types

    import torch.distributed as dist

    from medicalgpt.train.run import end_training

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(1.0)  # the main rank still writing the model
    entered = time.time()
    end_training(types.SimpleNamespace(wait_for_everyone=dist.barrier, end_training=dist.destroy_process_group))
    (stamps / f"{rank}").write_text(f"{entered} {time.time()}")


def test_ranks_leave_training_together(tmp_path):
    """A rank with nothing to save must not shut its interpreter down while the main rank still writes: it waits."""
    import torch.multiprocessing as mp

    mp.spawn(_end_training_on_rank, args=(tmp_path / "store", tmp_path), nprocs=2)
    main_entered, _ = map(float, (tmp_path / "0").read_text().split())
    _, other_left = map(float, (tmp_path / "1").read_text().split())
    assert other_left >= main_entered


RANK_SCRIPT = """
import atexit, sys, threading, time
from medicalgpt.cli import run_cli

class Teardown:
    def __del__(self):
        print("interpreter teardown ran", flush=True)

kept = Teardown()

def main():
    atexit.register(lambda: print("atexit handler ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    print("work done")

sys.exit(run_cli(main))
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_of_a_multiprocess_run_leaves_without_interpreter_teardown(world_size, tmp_path):
    """Under torchrun (WORLD_SIZE > 1) a finished rank skips the teardown in which gloo's surviving worker threads can
    abort the process; its threads are joined, its atexit handlers run and its output is flushed all the same."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    env = {**ENV, "WORLD_SIZE": world_size, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["work done", "thread finished", "atexit handler ran"]
    assert ("interpreter teardown ran" in lines) == (world_size == "1")


def test_rerun_resumes_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(8)])
    out = tmp_path / "out"
    argv = [sys.executable, "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--do_train"]
    argv += ["--train_file_dir", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2"]
    argv += ["--save_strategy", "steps", "--save_steps", "2", *FAST_FLAGS]
    first = run([*argv, "--max_steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir()
    second = run([*argv, "--max_steps", "4"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in second.stderr
    assert global_step(out) == 4
    shutil.rmtree(out / "checkpoint-4")
    fresh = run([*argv, "--max_steps", "2", "--overwrite_output_dir"])
    assert "Resuming from" not in fresh.stderr


def test_the_same_seed_gives_the_same_lora_weights_and_another_seed_others(tiny_model_dir, tmp_path):
    """--seed reaches what is built before the Trainer seeds the generators: LoRA's initial weights."""
    import torch
    from safetensors.torch import load_file

    import supervised_finetuning

    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"问题{i}", "output": "回答" * i} for i in range(1, 5)])
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--max_steps", "1",
            "--template_name", "qwen", "--use_peft", "True", "--save_strategy", "no", *FAST_FLAGS]  # fmt: skip
    adapters = []
    for run_name, seed in (("a", "42"), ("b", "42"), ("c", "7")):
        torch.manual_seed(int(run_name == "b"))  # whatever came before the run
        out = tmp_path / run_name
        supervised_finetuning.main([*argv, "--seed", seed, "--output_dir", str(out)])
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    same, other = adapters[1], adapters[2]
    assert same.keys() == adapters[0].keys() == other.keys()
    assert all(torch.equal(same[name], weight) for name, weight in adapters[0].items())
    assert not any(torch.equal(other[name], weight) for name, weight in adapters[0].items() if "lora_A" in name)
