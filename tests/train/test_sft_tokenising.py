"""SFT preprocessing's batched, fast path (prepare_sft_dataset: one fast-tokenizer call per batch, the BOS decided once
per batch, the column types declared to `.map`) gives exactly the ids and labels of the per-conversation reference
(tokenize_conversation: `tokenizer.encode` per text), on the repository's data (alpaca, OpenAI messages, multi-turn
ShareGPT, tool calls) and, where present, upstream MedicalGPT's SFT files with the real Qwen2.5 tokenizer."""

import copy
import dataclasses
import os
from pathlib import Path

import datasets
import pytest
from tokenizers import processors

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.sft import COLUMNS, prepare_sft_dataset, tokenize_conversation
from medicalgpt.templates import get_conv_template
from medicalgpt.train.records import load_file_records
from tests.helpers import REPO

REPO_FILES = sorted(str(path) for path in (REPO / "data" / "finetune").glob("*.jsonl"))
UPSTREAM = Path(os.environ.get("MEDICALGPT_UPSTREAM_SFT", REPO.parent / "shared" / "data" / "upstream" / "sft"))
QWEN_TOKENIZER = REPO / "models" / "qwen2.5-vocab-tiny"
# (max_length, overlong, train_on_inputs, system_prompt): whole conversations, cut and dropped turns, skipped ones
SETTINGS = [(None, "truncate", False, None), (48, "truncate", False, None), (48, "drop", True, "你是一名医生。")]


def reference(records, template, tokenizer, max_length, overlong, train_on_inputs, system_prompt):
    """The conversations kept, each tokenised on its own by tokenize_conversation (one encode call per text)."""
    rows = [
        tokenize_conversation(record, template, tokenizer, max_length, train_on_inputs, system_prompt, overlong)
        for record in records
    ]
    return [(row["input_ids"], row["labels"]) for row in rows if row["input_ids"]]


def check_equal_to_reference(records, template, tokenizer, settings):
    for max_length, overlong, train_on_inputs, system_prompt in settings:
        dataset = prepare_sft_dataset(
            records, template, tokenizer, max_length, train_on_inputs, system_prompt, overlong=overlong
        )
        expected = reference(records, template, tokenizer, max_length, overlong, train_on_inputs, system_prompt)
        got = list(zip(dataset["input_ids"], dataset["labels"]))
        assert len(got) == len(expected), (max_length, overlong)
        assert got == expected, (max_length, overlong)
        assert dataset.features == datasets.Features({key: COLUMNS[key] for key in ("input_ids", "labels")})


def test_batched_path_equals_the_per_conversation_reference(tiny_tokenizer):
    records = load_file_records(REPO_FILES, "sft")
    assert {"function_call", "observation"} <= {m["role"] for r in records for m in r["messages"]}  # tool calls in
    assert max(len(r["messages"]) for r in records) >= 4  # multi-turn conversations in
    check_equal_to_reference(records, get_conv_template("qwen"), tiny_tokenizer, SETTINGS)


def test_a_tokenizer_that_adds_a_bos_gets_one_bos_per_conversation(tiny_tokenizer):
    """The BOS is decided once per batch: a template text without it gets the tokenizer's BOS first, one with it
    (the template writes it itself) gets none."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    records = load_file_records(REPO_FILES, "sft")
    check_equal_to_reference(records, get_conv_template("qwen"), tokenizer, SETTINGS[:1])
    first_ids = prepare_sft_dataset(records, get_conv_template("qwen"), tokenizer, None)["input_ids"]
    assert all(ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:] for ids in first_ids)
    qwen = get_conv_template("qwen")  # always renders a system block: every conversation starts with it
    writes_bos = dataclasses.replace(qwen, name="writes-bos", system_format="<s>" + qwen.system_format)
    ids = prepare_sft_dataset(records, writes_bos, tokenizer, None)["input_ids"]
    assert all(row.count(tokenizer.bos_token_id) == 1 and row[0] == tokenizer.bos_token_id for row in ids)
    check_equal_to_reference(records, writes_bos, tokenizer, SETTINGS[:1])


def test_the_tokenising_map_does_not_walk_every_token_id(tiny_tokenizer, monkeypatch):
    """With the column types declared, datasets (5.2, map's on_mixed_types="use_json") skips its Python walk over
    every token id looking for mixed types (~10% of the tokenising time)."""
    import datasets.arrow_writer

    def walked(*args, **kwargs):
        raise AssertionError("datasets walked the token ids for mixed types")

    monkeypatch.setattr(datasets.arrow_writer, "find_mixed_struct_types_field_paths", walked)
    records = load_file_records(REPO_FILES, "sft")
    dataset = prepare_sft_dataset(records, get_conv_template("qwen"), tiny_tokenizer, 64)  # a length no other test has
    assert len(dataset) == len(records) and all(IGNORE_INDEX in labels for labels in dataset["labels"])


@pytest.mark.real_model
@pytest.mark.skipif(
    not UPSTREAM.is_dir() or not QWEN_TOKENIZER.is_dir(), reason="upstream's files; make qwen-tokenizer"
)
def test_upstream_files_with_the_qwen_tokenizer_equal_the_reference():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    files = [str(UPSTREAM / name) for name in ("medical_sft_1K_format.jsonl", "glaive_toolcall_zh_demo.jsonl")]
    records = load_file_records(files, "sft", skip_invalid=True)
    sharegpt = load_file_records([str(UPSTREAM / "sharegpt_zh_1K_format.jsonl")], "sft", skip_invalid=True)
    records = datasets.concatenate_datasets([records, sharegpt.select(range(300))])  # long multi-turn ones
    check_equal_to_reference(records, get_conv_template("qwen"), tokenizer, [(1024, "truncate", False, None)])
