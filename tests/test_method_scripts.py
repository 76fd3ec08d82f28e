"""run_kto.sh, run_cpo.sh (SimPO) and run_dpo.sh with IPO as a new user runs them after run_sft.sh: each trains a
new adapter on the SFT adapter in outputs-sft-qwen-v1, merge_peft_adapter.py merges it, and inference.py answers with
the merged model."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import ENV, REPO, run

WORKSPACE_ITEMS = ["medicalgpt", "scripts", "data", "template.py", "dpo_training.py", "kto_training.py",
                   "cpo_training.py", "inference.py", "merge_peft_adapter.py", "run_dpo.sh", "run_kto.sh",
                   "run_cpo.sh"]  # fmt: skip
# Small and quick, after the script's own flags (EXTRA_ARGS come last and win)
QUICK = "--max_steps 2 --gradient_accumulation_steps 1 --per_device_train_batch_size 2 --max_eval_samples 2"


@pytest.mark.multiprocess
@pytest.mark.parametrize(("script", "extra", "output"), [
    ("run_kto.sh", "", "outputs-kto-qwen-v1"),
    ("run_cpo.sh", "", "outputs-simpo-qwen-v1"),
    ("run_dpo.sh", "--loss_type ipo", "outputs-dpo-qwen-v1"),
])  # fmt: skip
def test_method_script_trains_on_the_sft_adapter_and_inference_answers_with_it(script, extra, output, sft_adapter_dir,
                                                                               tmp_path):  # fmt: skip
    for item in WORKSPACE_ITEMS:
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, tmp_path / item)
    shutil.copytree(sft_adapter_dir, tmp_path / "outputs-sft-qwen-v1")  # what run_sft.sh leaves
    environment = {k: v for k, v in ENV.items() if k != "MODEL"} | {"PYTHON": sys.executable,
                                                                      "EXTRA_ARGS": f"{QUICK} {extra}"}  # fmt: skip
    result = subprocess.run(["bash", script], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MODEL is not set: using the previous stage's output outputs-sft-qwen-v1" in result.stderr
    out = tmp_path / output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "outputs-sft-qwen-v1")
    lora_b = [tensor for name, tensor in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b), "the adapter trained (LoRA B starts at 0)"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2

    merge = run([sys.executable, "merge_peft_adapter.py", "--peft_model_path", output, "--output_dir", "merged"],
                cwd=tmp_path)  # fmt: skip
    assert merge.returncode == 0, merge.stderr[-3000:]
    answers = tmp_path / "answers.jsonl"
    inference = run([sys.executable, "inference.py", "--base_model", "merged", "--template_name", "qwen",
                     "--data_file", "data/inference/input.jsonl", "--output_file", str(answers),
                     "--max_new_tokens", "4", "--temperature", "0"], cwd=tmp_path)  # fmt: skip
    assert inference.returncode == 0, inference.stderr[-3000:]
    questions = (tmp_path / "data" / "inference" / "input.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "output"} for row in rows] == [json.loads(q) for q in questions]
    assert all(isinstance(row["output"], str) for row in rows)
