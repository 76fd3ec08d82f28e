"""The project's GPU check, in one run (bench/gpu_check.sh starts it): what CPU tests cannot show, on a
Qwen2.5-0.5B-shaped model built offline (random weights saved in bf16, as Qwen2.5 ships; no download).

- `sft_bf16`: full SFT through supervised_finetuning.py on data/finetune: bf16 autocast, flash-attn if installed
  (else sdpa), packing, float32 trainable weights (medicalgpt/precision.py): losses, tokens/s (the Trainer's count
  of input tokens: packed rows, so nearly no padding), MFU (6 x parameters per token against --peak_tflops), the
  output's saved dtype and the share of its weights changed.
- `qlora_4bit`: QLoRA (4-bit NF4 base, LoRA adapters) through the same script, when bitsandbytes is installed.
- `zero3_one_gpu`: the same full SFT under DeepSpeed ZeRO-3 on one GPU (torchrun, 1 process), when deepspeed is
  installed; the gathered output loads and moved.
- `loss_memory`: bench/gpu_mfu.py on the 0.5B shape at 4096 tokens per row: peak memory, tokens/s and MFU of trl's
  fused LM head, the chunked loss and the plain loss over the whole logits.
- `packed_attention`: one bf16 training step on two packed rows of 4096 tokens (4 long or 32 short conversations
  each), transformers' sdpa with its block-diagonal mask against packed_sdpa (bench/packed_attention_ab.py): the
  figures that decide whether SFT turns packed_sdpa on for GPUs (medicalgpt/train/packing.py: CPU only so far).
Prints one JSON object; a check that cannot run says why (`skipped`), one that failed keeps its error's tail.
`--dry-run`: tiny shapes on whatever device there is (CPU here), 2 steps: checks this script, not the GPU.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OPTIONAL = ("trl", "datasets", "peft", "accelerate", "flash_attn", "bitsandbytes", "deepspeed", "liger_kernel")
SFT_FLAGS = ["--template_name", "qwen", "--train_file_dir", "data/finetune", "--do_train", "--learning_rate", "2e-5",
             "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
             "--include_num_input_tokens_seen", "True", "--warmup_steps", "0"]  # fmt: skip


def environment():
    import torch

    versions = {}
    for name in ("torch", "transformers", *OPTIONAL):
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = getattr(__import__(name), "__version__", "?")
        except Exception as error:  # noqa: BLE001 -- a package that fails to import is reported, not fatal
            versions[name] = f"import failed: {str(error)[:200]}"
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "versions": versions,
        "missing": sorted(name for name, version in versions.items() if version is None),
    }


def build_model(folder, dry_run):
    """A Qwen2.5-0.5B-shaped model (bf16, tied embeddings) with the project's tiny BPE tokenizer (its ids fit)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bench.gpu_mfu import QWEN25_COMMON, QWEN25_SHAPES
    from medicalgpt.quickstart.tiny_model import build_tiny_model
    from tests.helpers import CORPUS

    tokenizer_dir = build_tiny_model(os.path.join(folder, "tokenizer"), CORPUS)
    shape = QWEN25_SHAPES["smoke" if dry_run else "0.5B"]
    common = dict(QWEN25_COMMON, vocab_size=4096) if dry_run else QWEN25_COMMON
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, **common)).to(torch.bfloat16)
    model.save_pretrained(os.path.join(folder, "base"))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(os.path.join(folder, "base"))
    return os.path.join(folder, "base"), sum(p.numel() for p in model.parameters())


def run(command, timeout):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return time.perf_counter() - start, result


def trained(base, output_dir, parameters, peak_tflops, seconds):
    """Losses, speed and the output of an SFT run in `output_dir`, trained from `base`."""
    import torch
    from transformers import AutoModelForCausalLM

    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    history = state["log_history"]
    losses = [round(entry["loss"], 4) for entry in history if "loss" in entry]
    summary = next(entry for entry in reversed(history) if "train_runtime" in entry)
    tokens = state.get("num_input_tokens_seen") or 0
    figures = {"losses": losses, "process_s": round(seconds, 1), "train_runtime_s": summary["train_runtime"],
               "tokens": tokens, "tokens_per_s": round(tokens / summary["train_runtime"])}  # fmt: skip
    if torch.cuda.is_available():
        figures["mfu_6N"] = round(6 * parameters * figures["tokens_per_s"] / (peak_tflops * 1e12), 4)
    config = os.path.join(output_dir, "config.json")
    if os.path.isfile(config):  # a full model: its dtype and the weights that moved
        figures["saved_dtype"] = json.load(open(config)).get("dtype")
        before = AutoModelForCausalLM.from_pretrained(base, dtype="auto").state_dict()
        after = AutoModelForCausalLM.from_pretrained(output_dir, dtype="auto").state_dict()
        moved = sum(int((after[name] != weight).sum()) for name, weight in before.items())
        figures["weights_changed"] = round(moved / sum(w.numel() for w in before.values()), 4)
    return figures


def check_sft(args, base, parameters, folder, attention):
    out = os.path.join(folder, "sft")
    steps, length, batch = ("2", "256", "2") if args.dry_run else ("12", "1024", "4")
    command = [sys.executable, "supervised_finetuning.py", "--model_name_or_path", base, "--output_dir", out,
               "--max_steps", steps, "--model_max_length", length, "--per_device_train_batch_size", batch,
               "--attn_implementation", attention, *SFT_FLAGS]  # fmt: skip
    seconds, _ = run(command, timeout=240)
    return {"attention": attention, **trained(base, out, parameters, args.peak_tflops, seconds)}


def check_qlora(args, base, parameters, folder):
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install -r requirements-gpu.txt)"}
    out = os.path.join(folder, "qlora")
    steps, length = ("2", "256") if args.dry_run else ("12", "1024")
    command = [sys.executable, "supervised_finetuning.py", "--model_name_or_path", base, "--output_dir", out,
               "--max_steps", steps, "--model_max_length", length, "--per_device_train_batch_size", "4",
               "--load_in_4bit", "True", "--use_peft", "True", "--learning_rate", "2e-4", *SFT_FLAGS]  # fmt: skip
    seconds, _ = run(command, timeout=240)
    figures = trained(base, out, parameters, args.peak_tflops, seconds)
    figures.pop("mfu_6N", None)  # 6N does not hold for frozen 4-bit weights
    from safetensors import safe_open

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        figures["adapter_dtypes"] = sorted({f.get_slice(key).get_dtype() for key in f.keys()})
    return figures


def check_zero3(args, base, parameters, folder):
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not installed (pip install -r requirements-gpu.txt)"}
    if not torch.cuda.is_available():
        return {"skipped": "ZeRO-3 through the Trainer needs a GPU (CPU processes: tests/deepspeed_cpu.py)"}
    out = os.path.join(folder, "zero3")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "supervised_finetuning.py",
               "--model_name_or_path", base, "--output_dir", out, "--max_steps", "6", "--model_max_length", "1024",
               "--per_device_train_batch_size", "4", "--deepspeed", "configs/ds_zero3.json", *SFT_FLAGS]  # fmt: skip
    seconds, _ = run(command, timeout=300)
    return trained(base, out, parameters, args.peak_tflops, seconds)


def check_loss_memory(args):
    if args.dry_run:
        command = [sys.executable, "bench/gpu_mfu.py", "--smoke", "--losses", "chunked"]  # one of its 3 runs
    else:
        command = [sys.executable, "bench/gpu_mfu.py", "--sizes", "0.5B", "--methods", "full", "--batchings",
                   "packed", "--losses", "fused,chunked,plain", "--seq_lens", "4096",
                   "--peak_tflops", str(args.peak_tflops)]  # fmt: skip
    _, result = run(command, timeout=300)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    keys = ("loss", "method", "seq_len", "real_tokens_per_s", "mfu", "peak_memory_gb", "seconds_per_step", "error")
    return [{key: run_[key] for key in keys if key in run_} for run_ in report.get("runs", [])] or report


def check_packed_attention(args, base):
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from bench.packed_attention_ab import interleaved_steps, synthetic_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model.train()
    row = 256 if args.dry_run else 4096
    report = {}
    for name, count in (("4_conversations", 4), ("32_conversations", 32)):
        batch = synthetic_rows([[row // count] * count] * 2, model.config.vocab_size, device)
        times, losses = interleaved_steps(model, batch, repeats=2 if args.dry_run else 5, chunked_loss=False)
        wall = {attention: statistics.median(t[1] for t in runs) for attention, runs in times.items()}
        report[name] = {"tokens": batch["input_ids"].numel(), **{f"{k}_s": round(v, 4) for k, v in wall.items()},
                        "speedup": round(wall["sdpa"] / wall["packed_sdpa"], 3),
                        "loss_difference": abs(losses["sdpa"] - losses["packed_sdpa"])}  # fmt: skip
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps, any device")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100 and H200: 989)")
    parser.add_argument("--workdir", default="/tmp/medicalgpt-gpu-check")
    args = parser.parse_args(argv)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON on stdout (DeepSpeed logs there when imported)
        report = run_checks(args)
    print(json.dumps(report, indent=2), file=stdout)
    return 1 if "error" in report or any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


def run_checks(args):
    started = time.perf_counter()
    report = {"environment": environment()}
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        report["skipped"] = "no CUDA GPU: nothing was run (--dry-run checks this script on CPU)"
        return report
    missing = [name for name in ("trl", "datasets", "peft", "accelerate") if name in report["environment"]["missing"]]
    if missing:
        report["error"] = f"{', '.join(missing)} not installed: carry their wheels (bench/gpu_check.sh says which)"
        return report
    base, parameters = build_model(args.workdir, args.dry_run)
    report["model"] = {"shape": "smoke" if args.dry_run else "Qwen2.5-0.5B", "parameters": parameters}
    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") and torch.cuda.is_available() else "sdpa"
    checks = {
        "sft_bf16": lambda: check_sft(args, base, parameters, args.workdir, attention),
        "qlora_4bit": lambda: check_qlora(args, base, parameters, args.workdir),
        "zero3_one_gpu": lambda: check_zero3(args, base, parameters, args.workdir),
        "loss_memory": lambda: check_loss_memory(args),
        "packed_attention": lambda: check_packed_attention(args, base),
    }
    for name, check in checks.items():
        try:
            report[name] = check()
        except Exception as error:  # noqa: BLE001 -- one check's failure is reported; the others still run
            report[name] = {"error": f"{type(error).__name__}: {str(error)[-1500:]}"}
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
