"""SFT speed on CPU: padded, padding-free and packed batches over one epoch of upstream's 1K medical SFT file.

    python bench/sft_throughput.py                                   # 1-4 minutes a batching on 2 cores
    MEDICALGPT_UPSTREAM=~/src/MedicalGPT python bench/sft_throughput.py    # + upstream's script, same model and flags
    python bench/sft_throughput.py --modes packed --model models/small --data my.jsonl

Each batching runs supervised_finetuning.py in its own process on a tiny Qwen2-shaped model (hidden 256, 4 layers,
built here unless --model is given): batch 8, max length 512, full fine-tuning in float32, one epoch. Printed as JSON:
for each run, the Trainer's train_runtime, the process's wall time, real (non-padding) tokens per second of training,
the padding fraction of the tokens processed, and peak memory (RSS). With MEDICALGPT_UPSTREAM pointing at a checkout
of shibing624/MedicalGPT (it needs `pip install loguru scikit-learn`), its training/supervised_finetuning.py runs
with the same flags, and the ratios of its times to ours are printed. Also: tokenising the file, cold and cached.
Measure on an idle machine (the load average is printed with each run).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "upstream", "sft", "medical_sft_1K_format.jsonl")
MODES = {
    "padded": ["--packing", "False"],
    "padding_free": ["--packing", "False", "--padding_free", "True"],
    "packed": [],  # the default
}


def common_flags(model, data, output_dir):
    return [
        "--model_name_or_path", model, "--train_file_dir", data, "--template_name", "qwen", "--do_train",
        "--per_device_train_batch_size", "8", "--model_max_length", "512", "--num_train_epochs", "1",
        "--learning_rate", "2e-5", "--use_peft", "False", "--torch_dtype", "float32", "--bf16", "False",
        "--gradient_checkpointing", "False", "--save_strategy", "no", "--logging_steps", "10", "--report_to", "none",
        "--disable_tqdm", "True", "--output_dir", output_dir,
    ]  # fmt: skip


def count_collated_tokens(collator_class, method, counts):
    """Wrap a collator's `method` so every batch adds its processed and real (non-padding) tokens to `counts`."""
    original = getattr(collator_class, method)

    def collate(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        counts["processed"] += batch["input_ids"].numel()
        mask = batch.get("attention_mask")  # padding-free batches have none, and no padding
        counts["real"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    setattr(collator_class, method, collate)


def run_child(kind, argv):
    """In the child process: train, then print {tokens, peak RSS}. `kind`: ours or upstream (a script path)."""
    counts = {"processed": 0, "real": 0}
    if kind == "ours":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        import supervised_finetuning

        count_collated_tokens(DataCollatorForLanguageModeling, "torch_call", counts)  # packed rows too
        supervised_finetuning.main(argv)
    else:
        import runpy

        from transformers import DataCollatorForSeq2Seq

        count_collated_tokens(DataCollatorForSeq2Seq, "__call__", counts)
        sys.path.insert(0, os.path.dirname(kind))
        sys.argv = [kind, *argv]
        runpy.run_path(kind, run_name="__main__")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({**counts, "peak_rss_mb": round(peak_mb)}), flush=True)


def measure(name, kind, argv, env):
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = [sys.executable, os.path.abspath(__file__), "--child", kind, "--", *argv]
    done = subprocess.run(child, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        return {"run": name, "error": (done.stderr or done.stdout)[-2000:]}
    counts = json.loads(lines[-1][len("BENCH ") :])
    output_dir = argv[argv.index("--output_dir") + 1]
    with open(os.path.join(output_dir, "train_results.json"), encoding="utf-8") as f:
        runtime = json.load(f)["train_runtime"]
    return {
        "run": name,
        "train_runtime_s": round(runtime, 1),
        "process_wall_s": round(wall, 1),
        "real_tokens": counts["real"],
        "processed_tokens": counts["processed"],
        "padding_fraction": round(1 - counts["real"] / max(1, counts["processed"]), 4),
        "real_tokens_per_s": round(counts["real"] / runtime),
        "peak_rss_mb": counts["peak_rss_mb"],
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def tokenising_seconds(model, data):
    """Seconds to validate and tokenise `data`: first run (empty cache), then a second run (cached)."""
    from transformers import AutoTokenizer

    from medicalgpt.data import find_data_files, load_records
    from medicalgpt.preprocess import prepare_sft_dataset
    from medicalgpt.training import to_dataset
    from template import get_conv_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        records = load_records(find_data_files(data, "sft"), "sft", skip_invalid=True)
        prepare_sft_dataset(to_dataset(records), get_conv_template("qwen"), tokenizer, 512)
        seconds.append(round(time.perf_counter() - start, 2))
    return {"cold_s": seconds[0], "cached_s": seconds[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a hidden-256, 4-layer tiny model built now)")
    parser.add_argument("--data", default=DATA, help="SFT .jsonl file (default: upstream's 1K medical file)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return run_child(args.child, rest[1:] if rest[:1] == ["--"] else rest)

    sys.path.insert(0, REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = tempfile.mkdtemp(prefix="bench-sft-")
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(work, "datasets-cache")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, *paths])
    os.environ["HF_DATASETS_CACHE"] = env["HF_DATASETS_CACHE"]
    model = args.model
    if not model:
        from medicalgpt.tiny_model import build_tiny_model

        model = build_tiny_model(os.path.join(work, "model"), hidden_size=256, num_layers=4)
    data = os.path.abspath(args.data)
    data_dir = os.path.join(work, "data")  # upstream reads a folder
    os.makedirs(data_dir)
    os.symlink(data, os.path.join(data_dir, os.path.basename(data)))

    results = {"data": data, "model": model, "cpu_threads": os.cpu_count(), "tokenising": {}, "runs": []}
    results["tokenising"] = tokenising_seconds(model, data)
    for mode in args.modes.split(","):
        argv = common_flags(model, data, os.path.join(work, mode)) + MODES[mode]
        results["runs"].append(measure(mode, "ours", argv, env))
    upstream = os.environ.get("MEDICALGPT_UPSTREAM")
    if upstream:
        script = os.path.join(os.path.abspath(upstream), "training", "supervised_finetuning.py")
        argv = common_flags(model, data_dir, os.path.join(work, "upstream"))
        upstream_env = {**env, "PYTHONPATH": os.pathsep.join([os.path.dirname(script), *paths])}
        results["runs"].append(measure("upstream", script, argv, upstream_env))
    by_name = {run["run"]: run for run in results["runs"] if "error" not in run}
    if "packed" in by_name:
        packed = by_name["packed"]
        results["tokenising"]["cold_fraction_of_packed_epoch"] = round(
            results["tokenising"]["cold_s"] / packed["train_runtime_s"], 3
        )
        if "upstream" in by_name:
            up = by_name["upstream"]
            results["upstream_over_packed"] = {
                "train_runtime": round(up["train_runtime_s"] / packed["train_runtime_s"], 2),
                "process_wall": round(up["process_wall_s"] / packed["process_wall_s"], 2),
                "real_tokens_per_s": round(packed["real_tokens_per_s"] / up["real_tokens_per_s"], 2),
            }
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
