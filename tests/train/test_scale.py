"""Data at scale (medicalgpt/train/records.py): records go from files to Arrow as they are validated, so the memory of
validation and tokenisation does not grow with the number of records; the records cache is content-addressed and
nothing is left behind by invalid data."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from medicalgpt.errors import DataValidationError
from medicalgpt.train.records import load_file_records
from tests.helpers import ENV, REPO, write_jsonl

# Validation and SFT tokenisation of one file, in a fresh process; prints the peak RSS in MB.
PREPROCESS = """
import resource, sys
import datasets
from transformers import AutoTokenizer
from medicalgpt.templates import build_template
from medicalgpt.processors.sft import prepare_sft_dataset
from medicalgpt.train.records import load_file_records

datasets.disable_progress_bars()
path, tokenizer_dir = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
records = load_file_records([path], "sft")
dataset = prepare_sft_dataset(records, build_template("qwen", tokenizer), tokenizer, 256)
assert len(dataset) == len(records), (len(dataset), len(records))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def small_records(count):
    return (
        {"instruction": f"问题{i}：发烧{i % 7}天怎么办？", "output": f"回答{i}：多喝水，观察{i % 5}天。"}
        for i in range(count)
    )


def peak_rss_mb(path, tokenizer_dir, cache):
    env = {**ENV, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PREPROCESS, str(path), tokenizer_dir], env=env, capture_output=True, text=True,
        timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_preprocessing_memory_does_not_grow_with_the_number_of_records(tmp_path, tiny_model_dir):
    """5,000 and 50,000 records: validated to Arrow and tokenised in peak memory that differs by less than 25 MB.
    Records held as a Python list (as before) cost ~1.4 KB each here: ~60 MB more at 50,000."""
    peaks = {}
    for count in (5_000, 50_000):
        path = write_jsonl(tmp_path / f"sft-{count}.jsonl", small_records(count))
        peaks[count] = peak_rss_mb(path, tiny_model_dir, tmp_path / f"cache-{count}")
    assert peaks[5_000] > 100, peaks  # MB: a process that imported transformers
    assert peaks[50_000] - peaks[5_000] < 25, peaks


def test_records_are_written_once_and_reused_by_content(tmp_path, datasets_cache, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", small_records(3))
    first = load_file_records([str(path)], "sft")
    assert first["source"] == [f"{path}:{line}" for line in (1, 2, 3)]
    assert first[0]["messages"] == [
        {"role": "user", "content": "问题0：发烧0天怎么办？"},
        {"role": "assistant", "content": "回答0：多喝水，观察0天。"},
    ]
    with caplog.at_level("INFO", logger="medicalgpt"):
        again = load_file_records([str(path)], "sft")
    assert again.cache_files == first.cache_files and "Validated records reused" in caplog.text
    written = os.stat(first.cache_files[0]["filename"]).st_mtime_ns
    rewritten = load_file_records([str(path)], "sft", overwrite=True)  # --overwrite_cache
    assert os.stat(rewritten.cache_files[0]["filename"]).st_mtime_ns != written
    write_jsonl(path, small_records(4))  # new content: a new folder
    assert len(load_file_records([str(path)], "sft")) == 4


def test_invalid_records_leave_nothing_behind_and_skipped_ones_are_counted(tmp_path, datasets_cache, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", [*small_records(2), {"instruction": "only a question"}])
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "medicalgpt")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    with pytest.raises(DataValidationError) as raised:
        load_file_records([str(path)], "sft")
    assert [str(e) for e in raised.value.errors] == [f"{path}:3: error: output: missing"]
    assert set(os.listdir(folder)) == before  # no records folder, no staging folder
    with caplog.at_level("WARNING"):
        records = load_file_records([str(path)], "sft", skip_invalid=True)
    assert len(records) == 2 and "skipped 1 invalid records" in caplog.text
    summary = json.loads(
        open(os.path.join(os.path.dirname(records.cache_files[0]["filename"]), "summary.json")).read()
    )
    assert (summary["records"], summary["skipped"]) == (2, 1)


def test_tokenised_data_is_reused_by_its_own_key_and_the_tokenizer_is_never_pickled_to_hash_it(
    tmp_path, datasets_cache, tiny_tokenizer, monkeypatch
):
    """The tokenising map's cache key comes from tokenising_fingerprint: the same records, tokenizer, template and
    settings reuse the cache file; each of them changed gives a new key; datasets never pickles the tokenizer."""
    import copy

    from datasets.fingerprint import Hasher

    from medicalgpt.processors.fingerprint import tokenising_fingerprint
    from medicalgpt.processors.pt import prepare_pretraining_dataset
    from medicalgpt.processors.sft import prepare_sft_dataset
    from medicalgpt.templates import get_conv_template

    hashed = []
    original_hash = Hasher.hash
    monkeypatch.setattr(Hasher, "hash", classmethod(lambda cls, value: hashed.append(value) or original_hash(value)))
    records = load_file_records([str(write_jsonl(tmp_path / "sft.jsonl", small_records(20)))], "sft")
    qwen, chatml = get_conv_template("qwen"), get_conv_template("chatml")
    first = prepare_sft_dataset(records, qwen, tiny_tokenizer, 64)
    again = prepare_sft_dataset(records, qwen, tiny_tokenizer, 64)
    assert again.cache_files == first.cache_files and again["input_ids"] == first["input_ids"]
    (tmp_path / "pt.txt").write_text("".join(f"第{i}段：发烧时多喝水。\n" for i in range(20)), encoding="utf-8")
    documents = load_file_records([str(tmp_path / "pt.txt")], "pt")
    blocks = prepare_pretraining_dataset(documents, tiny_tokenizer, 32)
    assert prepare_pretraining_dataset(documents, tiny_tokenizer, 32).cache_files == blocks.cache_files
    closures = [cell.cell_contents for value in hashed for cell in getattr(value, "__closure__", None) or ()]
    assert hashed and not any(value is tiny_tokenizer for value in [*hashed, *closures])

    key = tokenising_fingerprint(records, tiny_tokenizer, qwen, "sft", 64, False, None, "truncate")
    grown = copy.deepcopy(tiny_tokenizer)
    grown.add_tokens(["发烧"])
    others = [
        tokenising_fingerprint(records.select(range(10)), tiny_tokenizer, qwen, "sft", 64, False, None, "truncate"),
        tokenising_fingerprint(records, grown, qwen, "sft", 64, False, None, "truncate"),
        tokenising_fingerprint(records, tiny_tokenizer, chatml, "sft", 64, False, None, "truncate"),
        tokenising_fingerprint(records, tiny_tokenizer, qwen, "sft", 65, False, None, "truncate"),
        tokenising_fingerprint(records, tiny_tokenizer, qwen, "sft", 64, True, None, "truncate"),
        tokenising_fingerprint(records, tiny_tokenizer, qwen, "sft", 64, False, "Be brief.", "truncate"),
        tokenising_fingerprint(records, tiny_tokenizer, qwen, "sft", 64, False, None, "drop"),
    ]
    assert len({key, *others}) == 1 + len(others)
