"""SFT preprocessing's records/s against the raw fast-tokenizer encode of the same texts, side by side, one worker.

    flock /tmp/bench.lock python bench/tokenize_speed.py                  # both tokenizers, ~2 minutes
    python bench/tokenize_speed.py --tokenizers qwen --records 2000 --repeats 3  # a quick look

The texts: upstream MedicalGPT's SFT files (medical_sft_1K_format.jsonl, sharegpt_zh_1K_format.jsonl and the
tool-call demo glaive_toolcall_zh_demo.jsonl, in ../shared/data/upstream/sft; --data_dir), validated and normalised
by our records path (as --skip_invalid_examples: the ShareGPT file holds a conversation with no answer), repeated to
--records conversations, rendered by our template (`qwen` for Qwen2.5, `smollm2` for SmolLM2).
Measured, interleaved (each repeat runs every contender, in a rotated order) and repeated (--repeats):

  raw_encode  the tokenizers library alone: `Tokenizer.encode_batch_fast` on exactly the strings our preprocessing
              encodes (every prompt and answer of every turn), batched as our `.map` batches them (1000 records);
              the strings are rendered beforehand, outside the timing.
  sft_map     our SFT preprocessing from validated records: medicalgpt.processors.sft.prepare_sft_dataset (template
              rendering, tokenising, label masking, the overlong policy, the Arrow file `.map` writes), caching off so
              every repeat does the work.
  from_files  the whole path from the JSONL files: validation and normalisation into the records Arrow file
              (medicalgpt.train.records.load_file_records, written afresh), then sft_map.

One worker: this process only (datasets' num_proc=None), TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 set
before the tokenizers library loads, so the Rust encoder runs on one thread too. Reported per contender: the median
(and min-max) wall and CPU seconds (time.process_time) and records/s from the median CPU seconds; `ratio` is
records/s of ours over raw_encode (goal >= 0.8). The load average is printed: other jobs on the cores make wall time
noisy, CPU time less so.
"""

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker: before tokenizers loads
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import REPO, load_average, median_and_spread  # noqa: E402

DATA_DIRS = [os.path.join(REPO, "..", "shared", "data", "upstream", "sft"), "/work/shared/data/upstream/sft"]
FILES = ("medical_sft_1K_format.jsonl", "sharegpt_zh_1K_format.jsonl", "glaive_toolcall_zh_demo.jsonl")
TOKENIZERS = {  # name: (folder under models/, our template)
    "qwen": ("qwen2.5-vocab-tiny", "qwen"),
    "smollm2": ("smollm2-135m-instruct", "smollm2"),
}
MAP_BATCH = 1000  # datasets' default .map batch size, which prepare_sft_dataset uses
MAX_LENGTH = 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizers", default="qwen,smollm2", help=f"comma-separated: {', '.join(TOKENIZERS)}")
    parser.add_argument("--records", type=int, default=3000, help="conversations per run (the files repeated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=MAX_LENGTH)
    parser.add_argument("--data_dir", default=None, help="folder of upstream's SFT files (default: ../shared/...)")
    parser.add_argument("--contenders", default="raw_encode,sft_map,from_files")
    return parser.parse_args(argv)


def data_files(data_dir):
    for folder in [data_dir] if data_dir else DATA_DIRS:
        paths = [os.path.join(folder, name) for name in FILES]
        if all(os.path.isfile(path) for path in paths):
            return [os.path.abspath(path) for path in paths]
    raise SystemExit(f"upstream's SFT files {FILES} not found in {data_dir or DATA_DIRS}: pass --data_dir")


def repeated_files(files, count, folder):
    """The files' lines repeated (in turn) into one JSONL file of `count` lines: the from_files input."""
    lines = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines += [line for line in f if line.strip()]
    path = os.path.join(folder, "sft.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            lines[i % len(lines)] if lines[i % len(lines)].endswith("\n") else lines[i % len(lines)] + "\n"
            for i in range(count)
        )
    return [path]


class Contenders:
    """The three measured paths over one tokenizer, template and set of records."""

    def __init__(self, tokenizer, template, records, jsonl, max_length):
        from medicalgpt.processors.sft import render_conversation

        self.tokenizer, self.template, self.records, self.jsonl = tokenizer, template, records, jsonl
        self.max_length = max_length
        self.backend = tokenizer._tokenizer
        self.encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.batches = []  # the strings each .map batch encodes
        for start in range(0, len(records), MAP_BATCH):
            rendered = [
                render_conversation(r, template)
                for r in records.select(range(start, min(start + MAP_BATCH, len(records))))
            ]
            self.batches.append([text for turns in rendered for turn in turns for text in turn])

    def raw_encode(self):
        for texts in self.batches:
            self.encode(texts, add_special_tokens=False)
        return len(self.records)

    def sft_map(self, records=None):
        from medicalgpt.processors.sft import prepare_sft_dataset

        out = prepare_sft_dataset(records or self.records, self.template, self.tokenizer, self.max_length)
        return len(out)

    def from_files(self):
        from medicalgpt.train.records import load_file_records

        return self.sft_map(load_file_records(self.jsonl, "sft", skip_invalid=True, overwrite=True))


def measure(contenders, names, repeats):
    """{name: [(wall, cpu, records)]}: every repeat runs every contender, rotated."""
    runs = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            count = getattr(contenders, name)()
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu, count))
    return runs


def summarise(runs):
    table = {}
    for name, samples in runs.items():
        wall, cpu = median_and_spread([s[0] for s in samples]), median_and_spread([s[1] for s in samples])
        table[name] = {
            "records": samples[0][2],
            "wall_s": [round(x, 3) for x in wall],
            "cpu_s": [round(x, 3) for x in cpu],
            "records_per_cpu_s": round(samples[0][2] / cpu[0], 1),
            "records_per_wall_s": round(samples[0][2] / wall[0], 1),
        }
    raw = table.get("raw_encode")
    for name, row in table.items():
        if raw and name != "raw_encode":
            row["ratio_cpu"] = round(row["records_per_cpu_s"] / raw["records_per_cpu_s"], 3)
            row["ratio_wall"] = round(row["records_per_wall_s"] / raw["records_per_wall_s"], 3)
    return table


def bench_tokenizer(name, args, files, folder):
    import datasets
    import tokenizers
    from transformers import AutoTokenizer

    from medicalgpt.templates import get_conv_template
    from medicalgpt.train.records import load_file_records

    model_dir, template_name = TOKENIZERS[name]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "models", model_dir))
    jsonl = repeated_files(files, args.records, folder)
    records = load_file_records(jsonl, "sft", skip_invalid=True)
    contenders = Contenders(tokenizer, get_conv_template(template_name), records, jsonl, args.max_length)
    datasets.disable_caching()  # every .map does its work (into a temporary file)
    load_before = load_average()
    runs = measure(contenders, args.contenders.split(","), args.repeats)
    return {
        "tokenizer": f"{model_dir} ({type(tokenizer).__name__}, tokenizers {tokenizers.__version__})",
        "template": template_name,
        "encode": contenders.encode.__name__,
        "texts": sum(len(batch) for batch in contenders.batches),
        "load_average": [load_before, load_average()],
        "contenders": summarise(runs),
    }


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the data warnings of upstream's files are not the point here
    files = data_files(args.data_dir)
    folder = tempfile.mkdtemp(prefix="bench-tokenize-")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(folder, "cache")  # before datasets reads its config
    started = time.perf_counter()
    try:
        results = {name: bench_tokenizer(name, args, files, folder) for name in args.tokenizers.split(",")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        "workers": "1 process, TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1, num_proc=None",
        "files": [os.path.basename(path) for path in files],
        "records": args.records,
        "repeats": args.repeats,
        "max_length": args.max_length,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
