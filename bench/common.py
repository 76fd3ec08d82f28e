"""Shared by the bench scripts: the model to measure and a few prompts."""

import argparse
import glob
import json
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(REPO, "models", "tiny-qwen")
REAL_MODEL = os.path.join(REPO, "models", "smollm2-135m-instruct")
UPSTREAM_MEDICAL_SFT = os.path.join(REPO, "..", "shared", "data", "upstream", "sft", "medical_sft_1K_format.jsonl")


def real_rows_parser(description):
    """The arguments the benches of training steps on the real model share: the model, the conversations (upstream's
    medical SFT file) and the row length; each bench adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REAL_MODEL)
    parser.add_argument("--data", default=UPSTREAM_MEDICAL_SFT)
    parser.add_argument("--max_length", type=int, default=1024)
    return parser


def model_path(path=None):
    """--model, else models/tiny-qwen (make tiny-model), else a tiny model built now in a temporary folder."""
    if path:
        return path
    if os.path.isfile(os.path.join(TINY_MODEL, "config.json")):
        return TINY_MODEL
    from medicalgpt.quickstart.tiny_model import build_tiny_model

    corpus = [os.path.join(REPO, "data", "pretrain", "*.txt"), os.path.join(REPO, "data", "finetune", "*.jsonl")]
    return build_tiny_model(tempfile.mkdtemp(prefix="bench-tiny-"), corpus)


def sample_questions(count):
    """`count` questions from the SFT sample data (repeated when there are fewer)."""
    questions = []
    for path in sorted(glob.glob(os.path.join(REPO, "data", "finetune", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if isinstance(record.get("instruction"), str):
                    questions.append((record["instruction"] + "\n" + (record.get("input") or "")).strip())
    questions = questions or ["小孩发烧怎么办？", "What helps a sore throat?"]
    return [questions[i % len(questions)] for i in range(count)]


def load_average():
    """The 1-minute load average: timings taken while other jobs share the cores are not comparable."""
    return round(os.getloadavg()[0], 2)


def pinned_threads_env(env, threads):
    """`env` with the math libraries' thread pools pinned to `threads` (the same for every contender)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {**env, **{name: str(threads) for name in names}}


def median_and_spread(values):
    """(median, min, max) of a list of numbers."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median, ordered[0], ordered[-1]
