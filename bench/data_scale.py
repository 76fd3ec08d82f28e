"""Data at scale: records/s and peak memory of validation and of SFT / PT preprocessing for N distinct records.

    python bench/data_scale.py                              # N = 10k and 100k, 1 and 2 workers
    python bench/data_scale.py --sizes 10000 100000 1000000 --workers 1 2
    python bench/data_scale.py --tokenizer models/qwen2.5-tokenizer   # default: models/qwen2.5-vocab-tiny if built

Records are generated from the project's own sample data (data/finetune, data/pretrain): every record is a sample
record in one of its shapes (alpaca, sharegpt, messages; text lines) with its question and answer varied by a number
and a reordering of the answer's sentences, so no two are equal and nothing is cached between sizes.

Each figure is measured in a fresh process (`--measure`), on a fresh datasets cache:
- validate: files -> validated, normalised Arrow records (medicalgpt.train.records.load_file_records);
- sft / pt: the tokenising `.map`s (prepare_sft_dataset at max length 2048; prepare_pretraining_dataset, blocks of
  1024) over those records, with --preprocessing_num_workers as given.
records/s is wall time over the phase; peak_rss_mb is the peak resident memory of the measuring process plus the
largest of its worker processes (ru_maxrss of self and of children). One JSON line per figure, then a table; the
1-minute load average is printed with each figure (the machine may be shared).
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python bench/data_scale.py` from anywhere

from bench.common import load_average, model_path  # noqa: E402

QWEN_TOKENIZER = os.path.join(REPO, "models", "qwen2.5-vocab-tiny")
SENTENCE_END = re.compile(r"(?<=[。！？.!?])")


def sample_records():
    """(sft records, pt texts) of the project's sample data, as written."""
    sft, pt = [], []
    for folder, out in (("finetune", sft), ("pretrain", pt)):
        for name in sorted(os.listdir(os.path.join(REPO, "data", folder))):
            with open(os.path.join(REPO, "data", folder, name), encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
            if folder == "pretrain":
                out += [json.loads(line)["text"] if name.endswith(".jsonl") else line for line in lines]
            else:
                out += [json.loads(line) for line in lines if "tool" not in name]  # plain conversations
    return sft, pt


def vary(text, index, rng):
    """`text` with its sentences reordered and the record's number added: distinct for every index."""
    sentences = [s for s in SENTENCE_END.split(text) if s]
    rng.shuffle(sentences)
    return f"({index}) " + "".join(sentences)


def varied_sft(record, index, rng):
    """A copy of a sample SFT record, in its own shape, with every turn varied."""
    if "conversations" in record:
        turns = [{**t, "value": vary(t["value"], index, rng)} for t in record["conversations"]]
        return {"conversations": turns}
    if "messages" in record:
        return {"messages": [{**m, "content": vary(m["content"], index, rng)} for m in record["messages"]]}
    instruction, output = vary(record["instruction"], index, rng), vary(record["output"], index, rng)
    return {**record, "instruction": instruction, "output": output}


def write_data(folder, count, seed=0):
    """`count` SFT records (sft.jsonl) and `count` PT documents (pt.txt) under `folder`."""
    sft, pt = sample_records()
    rng = random.Random(seed)
    with open(os.path.join(folder, "sft.jsonl"), "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps(varied_sft(sft[i % len(sft)], i, rng), ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "pt.txt"), "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(vary(pt[i % len(pt)], i, rng).replace("\n", " ") + "\n")


def peak_rss_mb():
    """(peak RSS of this process, of its largest child: a map worker, 0 without workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(own / 1024), round(children / 1024)


def measure(phase, data, workers, tokenizer_path):
    """One figure, in this (fresh) process: {"seconds", "records", "peak_rss_mb"}."""
    import datasets
    from transformers import AutoTokenizer

    from medicalgpt.processors.pt import prepare_pretraining_dataset
    from medicalgpt.processors.sft import prepare_sft_dataset
    from medicalgpt.templates import build_template
    from medicalgpt.train.records import load_file_records

    datasets.disable_progress_bars()
    stage = "pt" if phase in ("pt", "validate-pt") else "sft"
    phase = "validate" if phase.startswith("validate") else phase
    path = os.path.join(data, "pt.txt" if stage == "pt" else "sft.jsonl")
    start = time.perf_counter()
    records = load_file_records([path], stage)  # validated here, or reused from the copied records cache
    if phase == "validate":
        return {"seconds": time.perf_counter() - start, "records": len(records), "peak_rss_mb": peak_rss_mb()}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    start = time.perf_counter()
    if phase == "sft":
        template = build_template("qwen", tokenizer)
        out = prepare_sft_dataset(records, template, tokenizer, 2048, num_proc=workers)
    else:
        out = prepare_pretraining_dataset(records, tokenizer, 1024, num_proc=workers)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records": len(records), "rows": len(out), "peak_rss_mb": peak_rss_mb(), **rss_split()}


def rss_split():
    """Resident memory now, split: anonymous (the heap) and file-backed (pages of the memory-mapped Arrow files,
    which count in the peak RSS but are page cache the kernel reclaims), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {
        key: round(int(fields[name].split()[0]) / 1024)
        for key, name in (("anon_mb", "RssAnon"), ("file_mb", "RssFile"))
    }


def run_one(phase, size, workers, data, tokenizer_path, records_cache):
    """Measure one figure in a fresh process, on a fresh datasets cache holding only the validated records (copied
    from `records_cache`), so the tokenising maps are never found cached."""
    with tempfile.TemporaryDirectory(prefix="bench-data-cache-") as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if phase != "validate":
            shutil.copytree(os.path.join(records_cache, "medicalgpt"), os.path.join(cache, "medicalgpt"))
        command = [sys.executable, __file__, "--measure", phase, data, str(workers), tokenizer_path]
        done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    per_second = result["records"] / result["seconds"]
    row = {"phase": phase, "records": size, "workers": workers, "records_per_s": round(per_second),
           "records_per_s_per_worker": round(per_second / workers), "seconds": round(result["seconds"], 1),
           "peak_rss_mb": result["peak_rss_mb"][0], "worker_peak_rss_mb": result["peak_rss_mb"][1],
           "load_average": load_average()}  # fmt: skip
    row.update({key: result[key] for key in ("rows", "anon_mb", "file_mb") if key in result})
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--phases", nargs="+", default=["validate", "sft", "pt"], choices=["validate", "sft", "pt"])
    parser.add_argument("--tokenizer", default=None, help="Default: models/qwen2.5-vocab-tiny, else a tiny model's.")
    hidden = dict(nargs=4, metavar=("PHASE", "DATA", "WORKERS", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", **hidden)  # one figure in this process (run_one starts it)
    args = parser.parse_args(argv)
    if args.measure:
        phase, data, workers, tokenizer_path = args.measure
        print(json.dumps(measure(phase, data, int(workers) if int(workers) > 1 else None, tokenizer_path)))
        return
    tokenizer = args.tokenizer or (QWEN_TOKENIZER if os.path.isdir(QWEN_TOKENIZER) else model_path())
    print(json.dumps({"tokenizer": tokenizer, "cpus": os.cpu_count()}), flush=True)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
            write_data(data, size)
            records_cache = validate_once(data, tokenizer)
            for phase in args.phases:
                for workers in [1] if phase == "validate" else args.workers:
                    rows.append(run_one(phase, size, workers, data, tokenizer, records_cache))
                    print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(records_cache)
    print("\n| phase | records | workers | records/s | per worker | peak RSS MB (main / worker) | load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['records']:,} | {r['workers']} | {r['records_per_s']:,} | "
              f"{r['records_per_s_per_worker']:,} | {r['peak_rss_mb']:,} / {r['worker_peak_rss_mb']:,} | "
              f"{r['load_average']} |")  # fmt: skip


def validate_once(data, tokenizer):
    """A datasets cache holding the validated SFT and PT records of `data`, copied for each figure."""
    cache = tempfile.mkdtemp(prefix="bench-records-")
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    for phase in ("validate-sft", "validate-pt"):
        command = [sys.executable, __file__, "--measure", phase, data, "1", tokenizer]
        subprocess.run(command, env=env, check=True, capture_output=True)
    return cache


if __name__ == "__main__":
    main()
