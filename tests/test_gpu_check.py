"""bench/gpu_check.sh, as the GPU machine runs it, in its --dry-run mode (tiny shapes on CPU): every check runs its
real code path or says why it is skipped, and the JSON holds the figures the README reports."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ENV, REPO


@pytest.mark.multiprocess  # four subprocesses (two SFT runs, a model build, gpu_mfu): ~1-3 minutes on 2 cores
def test_gpu_check_dry_run_reports_every_check(tmp_path):
    command = ["bash", "bench/gpu_check.sh", "--dry-run", "--workdir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["environment"]["device"] == "cpu" and report["model"]["shape"] == "smoke"
    sft = report["sft_bf16"]
    assert len(sft["losses"]) == 2 and sft["tokens"] > 0 and sft["tokens_per_s"] > 0
    assert sft["saved_dtype"] == "bfloat16" and sft["weights_changed"] > 0  # saved in the checkpoint's bf16, moved
    assert report["qlora_4bit"]["adapter_dtypes"] == ["F32"]  # bitsandbytes 4-bit works on CPU too
    assert report["zero3_one_gpu"]["skipped"].startswith("ZeRO-3 through the Trainer needs a GPU")
    [loss_run] = report["loss_memory"]  # gpu_mfu.py --smoke's chunked-loss run (the GPU runs fused, chunked, plain)
    assert loss_run["loss"] == "chunked" and loss_run["real_tokens_per_s"] > 0 and "error" not in loss_run
    packed = report["packed_attention"]  # both layouts timed, the losses of the two attentions equal (bf16 rounding)
    assert packed.keys() == {"4_conversations", "32_conversations"}
    for layout in packed.values():
        assert layout["tokens"] == 512 and layout["sdpa_s"] > 0 and layout["packed_sdpa_s"] > 0
        assert layout["loss_difference"] < 0.05
