"""Data for `make quickstart` on the real model (SmolLM2-135M-Instruct, whose Chinese is weak): the English records of
the sample SFT and preference files, SFT records split into train and held-out, and three medical questions.

    python -m medicalgpt.quickstart.sample_data --output_dir outputs/quickstart/data

Writes sft/train.jsonl, sft/heldout.jsonl (the last --heldout English SFT records, never trained on), dpo/train.jsonl
and questions.jsonl (asked before and after training; inference.py's input format).
"""

import argparse
import json
import os

SFT_FILE = "data/finetune/messages_en.jsonl"
PREFERENCE_FILE = "data/reward/preference_messages_en.jsonl"
SYSTEM_PROMPT = (
    "You are a helpful and cautious medical information assistant. You do not diagnose; you explain, give safe "
    "general guidance, and recommend professional care when needed."
)  # the sample SFT data's own system prompt, so the questions are asked as SFT taught
QUESTIONS = [
    "I have had a fever of 38.5°C for two days. What should I do?",
    "What are the common side effects of ibuprofen?",
    "How can I lower my blood pressure without medication?",
]


def is_english(record):
    """No CJK ideographs anywhere in the record."""
    return not any("\u4e00" <= char <= "\u9fff" for char in json.dumps(record, ensure_ascii=False))


def read_english(path):
    with open(path, encoding="utf-8") as f:
        return [record for record in map(json.loads, filter(str.strip, f)) if is_english(record)]


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_quickstart_data(output_dir, heldout=6):
    sft = read_english(SFT_FILE)
    if len(sft) <= heldout:
        raise SystemExit(f"error: {SFT_FILE} has {len(sft)} English records; --heldout {heldout} leaves none to train")
    write_jsonl(os.path.join(output_dir, "sft", "train.jsonl"), sft[:-heldout])
    write_jsonl(os.path.join(output_dir, "sft", "heldout.jsonl"), sft[-heldout:])
    write_jsonl(os.path.join(output_dir, "dpo", "train.jsonl"), read_english(PREFERENCE_FILE))
    questions = [
        {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]} for q in QUESTIONS
    ]
    write_jsonl(os.path.join(output_dir, "questions.jsonl"), questions)
    return len(sft) - heldout, heldout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart/data")
    parser.add_argument("--heldout", type=int, default=6, help="English SFT records held out for the eval loss")
    args = parser.parse_args(argv)
    train, heldout = write_quickstart_data(args.output_dir, args.heldout)
    print(f"Quickstart data in {args.output_dir}: {train} SFT records to train on, {heldout} held out")


if __name__ == "__main__":
    main()
