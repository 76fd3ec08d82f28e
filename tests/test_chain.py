"""The chain and scale-out: run_*.sh picking up each other's outputs, two nodes on loopback, accelerate launch,
and resuming after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, FAST_FLAGS, REPO, free_port, global_step, run, write_jsonl

WORKSPACE_ITEMS = ["medicalgpt", "scripts", "examples", "data", "template.py", "pretraining.py",
                   "supervised_finetuning.py", "reward_modeling.py", "ppo_training.py", "dpo_training.py",
                   "orpo_training.py", "merge_peft_adapter.py", "inference.py"]  # fmt: skip


def adapter_base(path):
    return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.fixture
def workspace(tmp_path):
    """A copy of the project, so the scripts' default output folders land in a temporary directory."""
    for item in WORKSPACE_ITEMS:
        source = REPO / item
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, tmp_path / item)
    for script in REPO.glob("run_*.sh"):
        shutil.copy(script, tmp_path / script.name)
    return tmp_path


def run_stage(workspace, script, model=None, **env):
    """A run_*.sh; without `model`, MODEL is unset and the script picks up the previous stage's output."""
    environment = {**ENV, "PYTHON": sys.executable, "EXTRA_ARGS": "--max_steps 2", **env}
    environment = {**environment, "MODEL": model} if model else {k: v for k, v in environment.items() if k != "MODEL"}
    result = subprocess.run(["sh", script], cwd=workspace, env=environment, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.mark.multiprocess
def test_run_scripts_pick_up_the_previous_stage_output(workspace, tiny_model_dir):
    run_stage(workspace, "run_pt.sh", tiny_model_dir)
    assert adapter_base(workspace / "outputs-pt-qwen-v1") == tiny_model_dir
    merge = run([sys.executable, "merge_peft_adapter.py", "--peft_model_path", "outputs-pt-qwen-v1",
                 "--output_dir", "merged-pt-qwen-v1"], cwd=workspace)  # fmt: skip
    assert merge.returncode == 0, merge.stderr[-3000:]

    sft = run_stage(workspace, "run_sft.sh")
    assert "MODEL is not set: using the previous stage's output merged-pt-qwen-v1" in sft.stderr
    assert adapter_base(workspace / "outputs-sft-qwen-v1") == str(workspace / "merged-pt-qwen-v1")  # absolute
    run_stage(workspace, "run_rm.sh")
    assert adapter_base(workspace / "outputs-rm-qwen-v1") == str(workspace / "outputs-sft-qwen-v1")
    run_stage(workspace, "run_dpo.sh")
    assert adapter_base(workspace / "outputs-dpo-qwen-v1") == str(workspace / "outputs-sft-qwen-v1")
    ppo = run_stage(workspace, "run_ppo.sh", EXTRA_ARGS="--max_steps 2 --response_length 16")
    assert "--sft_model_path outputs-sft-qwen-v1 --reward_model_path outputs-rm-qwen-v1" in ppo.stderr
    assert global_step(workspace / "outputs-ppo-qwen-v1") == 2
    run_stage(workspace, "run_orpo.sh", tiny_model_dir)
    assert global_step(workspace / "outputs-orpo-qwen-v1") == 2


def sft_argv(model, data, out):
    return ["supervised_finetuning.py", "--model_name_or_path", model, "--train_file_dir", str(data), "--do_train",
            "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--output_dir", str(out),
            "--save_strategy", "no", *FAST_FLAGS]  # fmt: skip


@pytest.mark.multiprocess
def test_two_nodes_on_loopback_and_accelerate_launch_are_one_data_parallel_group(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(16)])
    single = run([sys.executable, *sft_argv(tiny_model_dir, data, tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    master_port = str(free_port())  # a fixed port can be held by another run on the machine: rendezvous then hangs
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", master_port,
                          *sft_argv(tiny_model_dir, data, tmp_path / "two-nodes")],
                         cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), errors[0][-3000:] + errors[1][-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launched = run(
        [*launcher, "--main_process_port", str(free_port()), *sft_argv(tiny_model_dir, data, tmp_path / "accelerate")]
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    steps = global_step(tmp_path / "single")
    assert steps == 8
    assert global_step(tmp_path / "two-nodes") == global_step(tmp_path / "accelerate") == steps // 2


def wait_for_checkpoint(output_dir, step, timeout=240):
    """Until a checkpoint at or past `step` exists (older ones are rotated away while the run goes on)."""
    deadline = time.time() + timeout
    while not any(int(d.name.split("-")[1]) >= step for d in output_dir.glob("checkpoint-*")):
        assert time.time() < deadline, f"no checkpoint past {step} in {output_dir}"
        time.sleep(0.05)


def complete_checkpoints(output_dir):
    checkpoints = [d for d in output_dir.iterdir() if d.name.startswith("checkpoint-")]
    assert all((d / "trainer_state.json").exists() for d in checkpoints), "a half-written checkpoint"
    return sorted(checkpoints, key=lambda d: int(d.name.split("-")[1]))


def kill_resume_argv(stage, max_steps, models, data, out):
    if stage == "sft":
        argv = ["supervised_finetuning.py", "--model_name_or_path", models["base"], "--train_file_dir", str(data),
                "--per_device_train_batch_size", "2"]  # fmt: skip
    else:
        argv = ["ppo_training.py", "--sft_model_path", models["sft"], "--reward_model_path", models["rm"],
                "--train_file_dir", str(data), "--use_peft", "True", "--response_length", "8",
                "--per_device_train_batch_size", "2"]  # fmt: skip
    return argv + ["--do_train", "--max_steps", str(max_steps), "--output_dir", str(out), "--save_strategy", "steps",
                   "--save_steps", "1", "--save_total_limit", "2", *FAST_FLAGS]  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_sigkilled_run_resumes_from_its_last_whole_checkpoint(stage, tiny_model_dir, sft_adapter_dir, rm_adapter_dir,
                                                              tmp_path):  # fmt: skip
    models = {"base": tiny_model_dir, "sft": sft_adapter_dir, "rm": rm_adapter_dir}
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(8)])
    out = tmp_path / "out"
    command = [sys.executable, *kill_resume_argv(stage, 500, models, data, out)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, cwd=REPO, env=ENV, start_new_session=True, **quiet)
    wait_for_checkpoint(out, 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    last = complete_checkpoints(out)[-1]
    last_step = int(last.name.split("-")[1])
    resumed = run([sys.executable, *kill_resume_argv(stage, last_step + 2, models, data, out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last}" in resumed.stderr
    assert global_step(out) == last_step + 2
    complete_checkpoints(out)


@pytest.mark.parametrize(
    ("steps", "limit", "best"),
    [([1, 2, 3, 4, 5], 2, None), ([1, 2, 3, 4, 5], 2, 2), ([1, 2, 3], 2, 3), ([2, 10, 11], 1, 2), ([1, 2], 3, None)],
)
def test_rotation_keeps_what_transformers_keeps_and_never_deletes_in_place(steps, limit, best, tmp_path, monkeypatch):
    """The same checkpoints survive as with transformers' rotate_checkpoints, and every folder is renamed into
    .partial before it is deleted: a run killed mid-delete leaves no half checkpoint where resuming looks."""
    from transformers.trainer_utils import rotate_checkpoints

    from medicalgpt.train import atomic_checkpoints

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    for run_dir in (theirs, ours):
        for step in steps:
            (run_dir / f"checkpoint-{step}").mkdir(parents=True)
            (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    deleted = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (deleted.append(Path(path)), rmtree(path, **kw)))
    best_of = lambda run_dir: str(run_dir / f"checkpoint-{best}") if best else None  # noqa: E731
    atomic_checkpoints.rotate_whole_checkpoints(str(ours), limit, best_of(ours))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    rotate_checkpoints(str(theirs), limit, best_of(theirs))
    assert sorted(d.name for d in ours.glob("checkpoint-*")) == sorted(d.name for d in theirs.glob("checkpoint-*"))
    assert all(path.parent.name == ".partial" and path.name.startswith("deleting-") for path in deleted)
    assert len(set(deleted)) == len(steps) - len(list(theirs.glob("checkpoint-*")))
