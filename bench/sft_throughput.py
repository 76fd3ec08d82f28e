"""SFT speed on equal work: upstream MedicalGPT, this project change by change, and LLaMA-Factory, on one CPU.

    python bench/sft_throughput.py --contenders ours --limit 64 --repeats 1        # a quick check, ~2 minutes
    MEDICALGPT_UPSTREAM=~/src/MedicalGPT python bench/sft_throughput.py \\
        --contenders upstream,llamafactory,ours --repeats 3                          # the full table
    MEDICALGPT_UPSTREAM=~/src/MedicalGPT python bench/sft_throughput.py --model models/smollm2-135m-instruct \\
        --max_length 1024 --batch_size 2 --limit 16 --pick spread --contenders best --method lora,full \\
        --json sft-real-1024.json                   # the real model at real lengths, LoRA and full: 20-27 minutes
    python bench/sft_throughput.py --contenders ours_chunked,llamafactory_packing --limit 128 --repeats 1 \\
        --profile 3                                                # where the time goes: top operators of 3 steps

Equal work: every contender trains on the same conversations (upstream's 1K medical SFT file, those that fit in
--max_length tokens with every template, so nobody truncates or skips; with --limit, the first ones or, with --pick
spread, ones spread over the lengths of all that fit), on the same model (a Qwen2-shaped tiny model, hidden 256,
2 layers, built here unless --model is given), with LoRA on all linear layers (rank 8) or all weights trained
(--method full; --method lora,full runs both), batch 8 (--batch_size), one epoch, float32, no bf16 autocast, no
gradient checkpointing, the same system prompt. Each run counts, from the batches its Trainer actually trains on,
the real (non-padding) tokens, the learned tokens (labels other than -100) and the learned spans (answers); the
table says how far each contender is from the first one ("equal work").

One row per change, so each gain is attributed:
  upstream            upstream's training/supervised_finetuning.py (MEDICALGPT_UPSTREAM: a checkout of
                      shibing624/MedicalGPT; it needs `pip install loguru`)
  ours_padded         padded batches, full logits loss          (--packing False --chunked_loss False)
  ours_padding_free   one flattened row per batch               (--packing False --padding_free True ...)
  ours_packed         conversations packed into rows            (--chunked_loss False)
  ours_chunked        packed rows + chunked loss: our defaults
  llamafactory_*      LLaMA-Factory 0.9.5: _unpacked batches, and _packing / _neat_packing (its packing on);
                      the same YAML otherwise. It pins older libraries: `sh bench/setup_llamafactory.sh` installs
                      it into bench/.venv-llamafactory (git-ignored); --llamafactory_python to use another.
Groups: upstream, ours (our four rows), llamafactory (its three), best (upstream, ours_chunked and
llamafactory_neat_packing: LLaMA-Factory's packing with attention kept within each conversation, as ours).

Runs are interleaved (each repeat visits every contender and method, in a rotated order) and repeated (--repeats),
each in its own process with OMP_NUM_THREADS pinned (--threads). Printed: a table of medians with their spread
(min-max), the training's CPU seconds (all threads; less sensitive than wall time to other jobs on the machine), real
tokens/s (real tokens / median training seconds), optimizer steps, MFU, peak RSS and the load average around each
run, then everything as JSON. Timings taken while other jobs share the cores are noisy: read the load average.

MFU: each row's FLOPs are counted by bench/flops.py from the model's config, the row's real and learned tokens and
the conversations' causal attention pairs (full: 6 per weight and token, LoRA: 4 per frozen weight and token plus 6
per adapter weight; the LM head at the learned tokens only), divided by the median training seconds and by the peak
that bench/peak.py measures first with the same threads, at the model's shapes and --max_length tokens (--peak
FILE reads a peak.py JSON instead, --peak none leaves MFU out). "mfu_cpu" in the JSON uses the training's CPU
seconds / threads instead of its wall-clock seconds.

--model benches another model; one that pads with its end-of-turn token (SmolLM2-Instruct pads with <|im_end|>) is
given its unknown token as pad, for every contender, so that real tokens can be counted as the non-padding ones.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "upstream", "sft", "medical_sft_1K_format.jsonl")
LLAMAFACTORY_PYTHON = os.path.join(REPO, "bench", ".venv-llamafactory", "bin", "python")
SYSTEM_PROMPT = "You are a helpful assistant."  # upstream's qwen template default, given to the others explicitly
OURS = {
    "ours_padded": ["--packing", "False", "--chunked_loss", "False"],
    "ours_padding_free": ["--packing", "False", "--padding_free", "True", "--chunked_loss", "False"],
    "ours_packed": ["--packing", "True", "--chunked_loss", "False"],
    "ours_chunked": ["--packing", "True", "--chunked_loss", "True"],
}
LLAMAFACTORY = {
    "llamafactory_unpacked": {"packing": False},
    "llamafactory_packing": {"packing": True},
    "llamafactory_neat_packing": {"packing": True, "neat_packing": True},
}
GROUPS = {
    "upstream": ["upstream"],
    "ours": list(OURS),
    "llamafactory": list(LLAMAFACTORY),
    "best": ["upstream", "ours_chunked", "llamafactory_neat_packing"],  # upstream, our defaults, LLaMA-Factory's best
}
METHODS = ("lora", "full")


# --- in the child process: train once, count what the Trainer trained on --------------------------------------------


def count_training_batches(counts, pad_token_id):
    """Wrap transformers' Trainer so every training batch adds its real and learned tokens and learned spans to
    `counts`, and train() records its optimizer steps and runtime. Public methods of the base class, which all three
    contenders' trainers inherit (checked on transformers 5.23 and 5.6)."""
    from transformers import Trainer

    training_step, train = Trainer.training_step, Trainer.train

    def counted_step(self, model, inputs, *args, **kwargs):
        # Padding is the pad token in every contender's batches (masks differ: LLaMA-Factory's packing marks its
        # padding 1, its neat packing passes a 4D mask); the tiny model's pad token is not its end-of-turn token.
        real, learned = inputs["input_ids"] != pad_token_id, inputs["labels"] != -100
        counts["real"] += int(real.sum())
        counts["learned"] += int(learned.sum())
        counts["spans"] += int((learned[:, 1:] & ~learned[:, :-1]).sum() + learned[:, 0].sum())
        start = time.perf_counter()
        loss = training_step(self, model, inputs, *args, **kwargs)
        counts["forward_backward_s"] += time.perf_counter() - start
        return loss

    def counted_train(self, *args, **kwargs):
        cpu_start = time.process_time()
        result = train(self, *args, **kwargs)
        counts["steps"], counts["train_s"] = self.state.global_step, result.metrics["train_runtime"]
        counts["train_cpu_s"] = time.process_time() - cpu_start  # all threads: less sensitive to other jobs' load
        return result

    Trainer.training_step, Trainer.train = counted_step, counted_train


def profile_training_steps(steps, top=30):
    """Profile the training loop from the start of the second training step (the first warms up) to the start of
    step `steps + 2` -- forward, backward, optimizer, data and logging -- with torch.profiler, and print the operators
    with the most CPU time of their own, where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    training_step, train = Trainer.training_step, Trainer.train
    profiler, seen = profile(activities=[ProfilerActivity.CPU]), {"steps": 0, "profiled": 0}

    def stop():
        if seen["profiled"]:
            profiler.stop()
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
            print(f"PROFILE of {seen['profiled']} training steps (CPU time, self)\n{table}", flush=True)
            seen["profiled"] = 0

    def profiled_step(self, *args, **kwargs):
        seen["steps"] += 1
        if seen["steps"] == 2:
            profiler.start()
        if seen["steps"] == steps + 2:
            stop()
        elif seen["steps"] >= 2:
            seen["profiled"] += 1
        return training_step(self, *args, **kwargs)

    def profiled_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        stop()
        return result

    Trainer.training_step, Trainer.train = profiled_step, profiled_train


def run_child(kind, model, argv, profile_steps=0):
    """Train as `kind` (ours, upstream: a script path, or llamafactory: a YAML file), then print the counts."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    counts = {"real": 0, "learned": 0, "spans": 0, "steps": 0, "train_s": 0.0, "train_cpu_s": 0.0}
    counts["forward_backward_s"] = 0.0
    if profile_steps:
        profile_training_steps(profile_steps)
    count_training_batches(counts, AutoTokenizer.from_pretrained(model).pad_token_id)
    if kind == "ours":
        import supervised_finetuning

        supervised_finetuning.main(argv)
    elif kind == "llamafactory":
        import yaml
        from llamafactory.train.tuner import run_exp

        with open(argv[0], encoding="utf-8") as f:
            run_exp(yaml.safe_load(f))
    else:
        import runpy

        sys.argv = [kind, *argv]
        runpy.run_path(kind, run_name="__main__")
    counts["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("BENCH " + json.dumps(counts), flush=True)


# --- in the main process: equal data, one command per contender, interleaved runs -----------------------------------


def select_conversations(data, model, max_length, limit, pick="first", margin=8):
    """(lines, token counts) of the records of `data` whose whole conversation fits in `max_length - margin` tokens
    with our qwen template (the margin covers the other contenders' extra newline / end token per turn), at most
    `limit` of them: the first ones (`pick` "first"), or ones spread over the lengths ("spread": sorted by length,
    the shortest, the longest and evenly spaced ranks between them), kept in the file's order."""
    from transformers import AutoTokenizer

    from medicalgpt.data.validate import load_records
    from medicalgpt.processors.sft import tokenize_conversation
    from medicalgpt.templates import get_conv_template

    tokenizer, template = AutoTokenizer.from_pretrained(model), get_conv_template("qwen")
    with open(data, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for record in load_records([data], "sft", skip_invalid=True):
        ids = tokenize_conversation(record, template, tokenizer, system_prompt=SYSTEM_PROMPT)["input_ids"]
        if 0 < len(ids) <= max_length - margin:
            kept.append((lines[int(record["source"].rsplit(":", 1)[1]) - 1], len(ids)))  # "path:line", from 1
    if limit and pick == "spread" and limit < len(kept):
        by_length = sorted(range(len(kept)), key=lambda index: kept[index][1])
        ranks = [round(j * (len(kept) - 1) / max(limit - 1, 1)) for j in range(limit)]
        kept = [kept[index] for index in sorted(by_length[rank] for rank in ranks)]
    elif limit:
        kept = kept[:limit]
    return [line for line, _ in kept], [length for _, length in kept]


def with_distinct_pad_token(model, folder):
    """`model` itself when it pads with a token that conversations never contain; else `folder`, the same model
    (weights linked, not copied) padding with its unknown token. Every contender then pads with a token of its own,
    and real tokens can be counted as the non-padding ones: SmolLM2-Instruct pads with <|im_end|>, its end of turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    in_text = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in in_text:
        return model
    if tokenizer.unk_token_id is None or tokenizer.unk_token_id in in_text:
        raise SystemExit(f"--model: {model} pads with a token of the conversations and has no unknown token instead")
    os.makedirs(folder)
    for name in os.listdir(model):
        source, target = os.path.join(model, name), os.path.join(folder, name)
        os.symlink(source, target) if name.endswith((".safetensors", ".bin")) else shutil.copy(source, target)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "pad_token_id": tokenizer.pad_token_id}, f, indent=2)
    return folder


def write_data(lines, work):
    """The selected lines as one sharegpt file in its own folder (ours and upstream read folders), and LLaMA-Factory's
    dataset_info.json beside it."""
    folder = os.path.join(work, "data")
    os.makedirs(folder)
    with open(os.path.join(folder, "sft.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    info = {
        "bench_sft": {
            "file_name": "data/sft.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
        }
    }
    with open(os.path.join(work, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    return folder


def shared_flags(args, model, data_dir, output_dir, method):
    """The flags ours and upstream share (upstream's own names): the run the issue measured; `method` "full" trains
    all weights (the LoRA flags are then unused)."""
    return [
        "--model_name_or_path", model, "--train_file_dir", data_dir, "--template_name", "qwen", "--do_train",
        "--per_device_train_batch_size", str(args.batch_size), "--model_max_length", str(args.max_length),
        "--num_train_epochs", "1", "--learning_rate", "2e-5", "--use_peft", str(method == "lora"),
        "--target_modules", "all",
        "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--torch_dtype", "float32",
        "--bf16", "False", "--gradient_checkpointing", "False", "--save_strategy", "no", "--logging_steps", "10",
        "--report_to", "none", "--disable_tqdm", "True", "--output_dir", output_dir, "--seed", "42",
    ]  # fmt: skip


def llamafactory_config(args, model, work, output_dir, options, method):
    """LLaMA-Factory's YAML for the same run; returns its path."""
    import yaml

    lora = {"lora_target": "all", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05} if method == "lora" else {}
    config = {
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": method, **lora,
        "dataset": "bench_sft", "dataset_dir": work,
        "template": "qwen", "default_system": SYSTEM_PROMPT, "cutoff_len": args.max_length, "overwrite_cache": True,
        "per_device_train_batch_size": args.batch_size, "num_train_epochs": 1.0, "learning_rate": 2e-5,
        "bf16": False, "fp16": False, "gradient_checkpointing": False, "disable_gradient_checkpointing": True,
        "save_strategy": "no", "logging_steps": 10, "report_to": "none", "disable_tqdm": True, "seed": 42,
        "output_dir": output_dir, "overwrite_output_dir": True, "plot_loss": False, **options,
    }  # fmt: skip
    path = output_dir + ".yaml"
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return path


def child_command(name, method, args, model, work, data_dir, output_dir):
    """(python, kind, argv, extra PYTHONPATH) that trains contender `name` once into `output_dir`."""
    flags = shared_flags(args, model, data_dir, output_dir, method)
    if name in OURS:
        return sys.executable, "ours", [*flags, "--system_prompt", SYSTEM_PROMPT, *OURS[name]], REPO
    if name == "upstream":
        upstream = os.path.abspath(os.path.expanduser(os.environ["MEDICALGPT_UPSTREAM"]))
        script = os.path.join(upstream, "training", "supervised_finetuning.py")
        # a validation folder, or upstream holds out validation_split_percentage of the training data
        return sys.executable, script, [*flags, "--validation_file_dir", data_dir], upstream
    config = llamafactory_config(args, model, work, output_dir, LLAMAFACTORY[name], method)
    return args.llamafactory_python, "llamafactory", [config], ""


def run_once(name, method, args, model, work, data_dir, env, index):
    """One training run of `name` in its own process: its counts, seconds and the load average around it."""
    output_dir = os.path.join(work, f"{name}-{method}-{index}")
    python, kind, argv, path = child_command(name, method, args, model, work, data_dir, output_dir)
    child_env = {**env, "PYTHONPATH": path, "DISABLE_VERSION_CHECK": "1"}
    load_before, start = load_average(), time.perf_counter()
    profile = ["--profile", str(args.profile)] if args.profile else []
    command = [python, os.path.abspath(__file__), "--child", kind, "--model", model, *profile, "--", *argv]
    done = subprocess.run(command, cwd=work, env=child_env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if args.profile:
        print(f"{name}: " + done.stdout[done.stdout.find("PROFILE") :].split("BENCH ")[0], flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        print(f"{name} {method}: failed\n{(done.stderr or done.stdout)[-3000:]}", file=sys.stderr)
        return {"contender": name, "method": method, "error": (done.stderr or done.stdout)[-1000:]}
    run = {"contender": name, "method": method, **json.loads(lines[-1][len("BENCH ") :]), "process_s": round(wall, 1)}
    run["load_before_after"] = [load_before, load_average()]
    print(f"{name} {method} #{index}: {run['train_s']:.1f} s training ({run['train_cpu_s']:.1f} s CPU), "
          f"{run['steps']} steps, {run['real']} real tokens, peak RSS {run['peak_rss_mb']} MB, "
          f"load {load_before} -> {load_average()}",
          flush=True)  # fmt: skip
    return run


def summarize(name, method, runs):
    """One row of the table from the runs of one contender with one method."""
    median, low, high = median_and_spread([run["train_s"] for run in runs])
    first = runs[0]
    return {
        "contender": name, "method": method, "runs": len(runs), "real_tokens": first["real"],
        "learned_tokens": first["learned"], "answers": first["spans"], "optimizer_steps": first["steps"],
        "median_train_s": round(median, 1), "spread_s": [round(low, 1), round(high, 1)],
        "real_tokens_per_s": round(first["real"] / median),
        "median_process_s": round(median_and_spread([run["process_s"] for run in runs])[0], 1),
        "median_train_cpu_s": round(median_and_spread([run["train_cpu_s"] for run in runs])[0], 1),
        "median_forward_backward_s": round(median_and_spread([run["forward_backward_s"] for run in runs])[0], 1),
        "peak_rss_mb": round(median_and_spread([run["peak_rss_mb"] for run in runs])[0]),
        "load_range": [min(min(run["load_before_after"]) for run in runs),
                       max(max(run["load_before_after"]) for run in runs)],
    }  # fmt: skip


def add_mfu(rows, model, lengths, peak, threads):
    """Each row's counted FLOPs (bench/flops.py: its own real and learned tokens, the selected conversations'
    attention pairs) and its MFU against `peak` GFLOP/s: over the median training seconds ("mfu"), and over the
    median training CPU seconds divided by the threads ("mfu_cpu", against the peak's own CPU-time rate: both
    rates are what the work reaches with the cores to itself, so other jobs' load inflates neither)."""
    from bench.flops import attention_pairs, mfu, read_config, training_flops

    config, pairs = read_config(model), attention_pairs(lengths)
    for row in rows:
        flops = training_flops(config, row["method"], row["real_tokens"], row["learned_tokens"], pairs)
        row["tflop"], row["flop_per_real_token"] = round(flops / 1e12, 3), round(flops / row["real_tokens"])
        if peak:
            row["mfu"] = round(mfu(flops, row["median_train_s"], peak["gflops"]), 4)
            cpu_peak = peak.get("gflops_per_cpu_s_x_threads", peak["gflops"])
            row["mfu_cpu"] = round(mfu(flops, row["median_train_cpu_s"] / threads, cpu_peak), 4)


def print_table(rows, conversations):
    reference = rows[0]
    header = f"{'contender':27}{'method':>7}{'convs':>6}{'answers':>8}{'real tok':>10}{'learned':>9}{'vs first':>9}"
    header += f"{'steps':>6}{'median s':>10}{'spread s':>14}{'CPU s':>7}{'real tok/s':>11}{'x upstream':>11}"
    print(header + f"{'MFU':>7}{'RSS MB':>8}{'load':>12}")
    for row in rows:
        upstream = next((r for r in rows if r["contender"] == "upstream" and r["method"] == row["method"]), None)
        gap = (row["real_tokens"] - reference["real_tokens"]) / reference["real_tokens"]
        versus = f"{row['real_tokens_per_s'] / upstream['real_tokens_per_s']:.2f}" if upstream else "-"
        spread, load = "{}-{}".format(*row["spread_s"]), "{}-{}".format(*row["load_range"])
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(f"{row['contender']:27}{row['method']:>7}{conversations:>6}{row['answers']:>8}{row['real_tokens']:>10}"
              f"{row['learned_tokens']:>9}{gap:>+9.2%}{row['optimizer_steps']:>6}{row['median_train_s']:>10}"
              f"{spread:>14}{row['median_train_cpu_s']:>7}{row['real_tokens_per_s']:>11}{versus:>11}{mfu:>7}"
              f"{row['peak_rss_mb']:>8}{load:>12}")  # fmt: skip


def contender_names(spec):
    names = [name for part in spec.split(",") for name in GROUPS.get(part.strip(), [part.strip()])]
    unknown = [name for name in names if name not in ("upstream", *OURS, *LLAMAFACTORY)]
    if unknown:
        raise SystemExit(f"--contenders: unknown {', '.join(unknown)}; known: {', '.join(GROUPS)} and the rows above")
    return list(dict.fromkeys(names))


def method_names(spec):
    methods = [method.strip() for method in spec.split(",")]
    if not methods or any(method not in METHODS for method in methods):
        raise SystemExit(f"--method: {spec!r}; give lora, full or both (lora,full)")
    return list(dict.fromkeys(methods))


def check_contenders(names, args):
    """Leave out, with a note, contenders whose software is not installed."""
    kept = []
    for name in names:
        if name == "upstream" and not os.environ.get("MEDICALGPT_UPSTREAM"):
            print("upstream: skipped, set MEDICALGPT_UPSTREAM to a checkout of shibing624/MedicalGPT", file=sys.stderr)
        elif name in LLAMAFACTORY and not os.path.isfile(args.llamafactory_python):
            print(f"{name}: skipped, no {args.llamafactory_python} (see the README)", file=sys.stderr)
        else:
            kept.append(name)
    return kept


def machine_peak(args, model, work, env):
    """{"gflops", ...}: the peak MFU is stated against, from --peak's JSON file or measured now by bench/peak.py
    (threads pinned as for the runs, the model's shapes at --max_length tokens); None with --peak none."""
    if args.peak == "none":
        return None
    path = args.peak
    if args.peak == "measure":
        path = os.path.join(work, "peak.json")
        command = [sys.executable, os.path.join(REPO, "bench", "peak.py"), "--model", model]
        command += ["--threads", str(args.threads), "--tokens", str(args.max_length), "--json", path]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench/peak.py failed:\n{done.stderr[-2000:]}")
    with open(path, encoding="utf-8") as f:
        measured = json.load(f)
    if "peak_for_mfu" not in measured:
        raise SystemExit(f"--peak: {path} has no peak_for_mfu (bench/peak.py's JSON with float32 measured)")
    peak = {**measured["peak_for_mfu"], "source": args.peak, "load_before_after": measured["load_before_after"]}
    print(f"peak for MFU: {peak['gflops']} GFLOP/s float32, {peak['layer']} {peak['kernel']}", flush=True)
    if measured.get("threads") != args.threads:
        print(f"warning: --peak was measured at {measured.get('threads')} threads, the runs use {args.threads}")
    return peak


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", default="upstream,ours,llamafactory", help="rows or groups, comma-separated")
    parser.add_argument("--method", default="lora", help="lora (all linear layers, rank 8), full, or lora,full")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, interleaved")
    parser.add_argument("--limit", type=int, help="at most this many conversations (default: all that fit)")
    parser.add_argument(
        "--pick",
        choices=("first", "spread"),
        default="first",
        help="with --limit: the first conversations that fit, or ones spread over the lengths of all that fit",
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every run")
    parser.add_argument("--model", help="model folder (default: a hidden-256, 2-layer tiny model built now)")
    parser.add_argument("--data", default=DATA, help="sharegpt .jsonl (default: upstream's 1K medical file)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--llamafactory_python", default=LLAMAFACTORY_PYTHON)
    parser.add_argument(
        "--peak",
        default="measure",
        help="the peak for MFU: measure (run bench/peak.py first), a JSON file bench/peak.py wrote, or none",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many training steps of every run after "
        "the first step, print the top operators (timings then include the profiler's overhead)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_known_args()


def prepare(args, env, work):
    """(model folder, selected lines, their token counts, data folder) for the runs."""
    if not os.path.isfile(args.data):
        raise SystemExit(f"--data: no file {args.data} (upstream's data/finetune/medical_sft_1K_format.jsonl)")
    if args.peak not in ("measure", "none") and not os.path.isfile(args.peak):
        raise SystemExit(f"--peak: no file {args.peak}")
    os.environ["HF_DATASETS_CACHE"] = env["HF_DATASETS_CACHE"]
    if args.model:
        model = with_distinct_pad_token(os.path.abspath(args.model), os.path.join(work, "model"))
    else:
        from medicalgpt.quickstart.tiny_model import build_tiny_model

        model = build_tiny_model(os.path.join(work, "model"), hidden_size=256, num_layers=2)
    lines, lengths = select_conversations(os.path.abspath(args.data), model, args.max_length, args.limit, args.pick)
    return model, lines, lengths, write_data(lines, work)


def main():
    args, rest = parse_args()
    if args.child:
        return run_child(args.child, args.model, rest[1:] if rest[:1] == ["--"] else rest, args.profile)
    names, methods = check_contenders(contender_names(args.contenders), args), method_names(args.method)
    work = tempfile.mkdtemp(prefix="bench-sft-")
    env = pinned_threads_env(os.environ, args.threads)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=os.path.join(work, "cache"))
    model, lines, lengths, data_dir = prepare(args, env, work)
    print(f"{len(lines)} conversations ({sum(lengths)} tokens, longest {max(lengths)}), {args.threads} threads, "
          f"work in {work}", flush=True)  # fmt: skip
    peak = machine_peak(args, model, work, env)
    pairs = [(name, method) for method in methods for name in names]
    runs = []
    for repeat in range(args.repeats):
        shift = repeat % len(pairs)
        for name, method in pairs[shift:] + pairs[:shift]:
            runs.append(run_once(name, method, args, model, work, data_dir, env, repeat))
    done = [run for run in runs if "error" not in run]
    of = {pair: [run for run in done if (run["contender"], run["method"]) == pair] for pair in pairs}
    rows = [summarize(name, method, of[name, method]) for name, method in pairs if of[name, method]]
    add_mfu(rows, model, lengths, peak, args.threads)
    print_table(rows, len(lines))
    results = {
        "conversations": len(lines), "conversation_tokens": sum(lengths), "longest": max(lengths),
        "threads": args.threads, "max_length": args.max_length, "batch_size": args.batch_size, "model": model,
        "peak": peak, "rows": rows, "runs": runs,
    }  # fmt: skip
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from bench.common import load_average, median_and_spread, pinned_threads_env

    main()
