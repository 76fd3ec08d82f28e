"""SFT packing keeps conversations apart, and SFT preprocessing is cached between runs."""

import os
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import supervised_finetuning
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.sft import prepare_sft_dataset, tokenize_conversation
from medicalgpt.templates import get_conv_template
from medicalgpt.train import packing as packing_module
from medicalgpt.train.packing import PackedRowsCollator, pack_rows, resolve_packing
from medicalgpt.train.records import cache_records
from tests.helpers import FAST_FLAGS, write_jsonl


def conversation(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)], "system": system, "tools": None}


RECORDS = [
    conversation(
        "小孩发烧怎么办？",
        "先测体温，多喝水。",
        "三天不退呢？",
        "请尽快就医。",
        "还要注意什么？",
        "注意休息，饮食清淡，多观察孩子的精神状态。",
    ),
    conversation("What helps a sore throat?", "Warm water and rest."),
    conversation("高血压吃什么药？", "请遵医嘱服用降压药，并定期测量血压。", system="你是一名医生。"),
    conversation("谢谢", "不客气。"),
]


def tokenised(tokenizer, train_on_inputs=False):
    template = get_conv_template("qwen")
    return [
        {key: value for key, value in tokenize_conversation(r, template, tokenizer, None, train_on_inputs).items()
         if key in ("input_ids", "labels")}
        for r in RECORDS
    ]  # fmt: skip


def load(model_dir, attention):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32).eval()


def packed_batch(examples, pad_token_id, layout):
    """All conversations in one row: kept as a row (sdpa/eager layout) or flattened by trl's padding-free collator."""
    rows = pack_dataset(datasets.Dataset.from_list(examples), sum(len(e["input_ids"]) for e in examples), "bfd")
    assert len(rows) == 1
    if layout == "rows":
        return PackedRowsCollator(pad_token_id)(list(rows)), rows[0]["seq_lengths"]
    batch = DataCollatorForLanguageModeling(pad_token_id, padding_free=True)(list(rows))
    flat = {key: batch[key] for key in ("input_ids", "labels", "position_ids")}
    return {**flat, "use_cache": False}, rows[0]["seq_lengths"]  # a KV cache turns the packing detection off


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packed_logits_and_loss_equal_unpacked(tiny_model_dir, tiny_tokenizer, attention, layout):
    model = load(tiny_model_dir, attention)
    examples = tokenised(tiny_tokenizer, train_on_inputs=True)  # every token learned: boundaries matter most
    padded = DataCollatorForLanguageModeling(tiny_tokenizer.pad_token_id)(examples)
    packed, seq_lengths = packed_batch(examples, tiny_tokenizer.pad_token_id, layout)
    assert packed["position_ids"][0].tolist() == [i for n in seq_lengths for i in range(n)]
    with torch.no_grad():
        unpacked_out, packed_out = model(**padded), model(**packed)
    lengths = padded["attention_mask"].sum(1).tolist()
    by_length = {n: logits[:n] for logits, n in zip(unpacked_out.logits, lengths)}
    for segment, n in zip(packed_out.logits[0].split(seq_lengths), seq_lengths):
        torch.testing.assert_close(segment, by_length[n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_out.loss, unpacked_out.loss, atol=1e-6, rtol=1e-6)

    # The test can fail: without the resets, or with a KV cache (transformers then ignores them), the later
    # conversations attend to the earlier ones.
    for leaky_inputs in ({"input_ids": packed["input_ids"]}, {**packed, "use_cache": True}):
        with torch.no_grad():
            leaky = model(**leaky_inputs).logits[0].split(seq_lengths)
        assert not torch.allclose(leaky[-1], by_length[seq_lengths[-1]], atol=1e-3)


def test_label_masks_survive_packing(tiny_tokenizer):
    examples = tokenised(tiny_tokenizer)
    rows = pack_rows(datasets.Dataset.from_list(examples), max_length=4096)
    assert sum(len(row["seq_lengths"]) for row in rows) == len(examples)
    pieces = []
    for row in rows:
        starts = [sum(row["seq_lengths"][:i]) for i in range(len(row["seq_lengths"]))]
        pieces += [(row["input_ids"][s : s + n], row["labels"][s : s + n]) for s, n in zip(starts, row["seq_lengths"])]
    assert sorted(pieces) == sorted((e["input_ids"], e["labels"]) for e in examples)
    assert max(len(row["seq_lengths"]) for row in rows) > 1
    batch = PackedRowsCollator(tiny_tokenizer.pad_token_id)(list(rows))
    # Conversations start with a prompt token: the collator's masking of each start changes nothing here.
    for labels, row in zip(batch["labels"].tolist(), rows):
        assert labels == row["labels"] + [IGNORE_INDEX] * (len(labels) - len(row["labels"]))
    assert "attention_mask" not in batch and batch["use_cache"] is False


def sft_trainer(model, tokenizer, output_dir, dataset, collator=None, packing=False):
    args = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=len(RECORDS), report_to="none",
                     bf16=False, use_cpu=True, max_length=4096, packing=packing)  # fmt: skip
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator
    )


@pytest.mark.parametrize("mode", ["trl", "rows"])
def test_sft_trainer_packed_batch_has_the_loss_of_the_unpacked_one(tiny_model_dir, tiny_tokenizer, tmp_path, mode):
    """Through SFTTrainer's dataset preparation, collator and loss (trl's fused LM head)."""
    model = load(tiny_model_dir, "sdpa")
    dataset = datasets.Dataset.from_list(tokenised(tiny_tokenizer))
    reference = sft_trainer(model, tiny_tokenizer, tmp_path / "padded", dataset)
    if mode == "trl":
        trainer = sft_trainer(model, tiny_tokenizer, tmp_path / "trl", dataset, packing=True)
    else:
        collator = PackedRowsCollator(tiny_tokenizer.pad_token_id)
        trainer = sft_trainer(model, tiny_tokenizer, tmp_path / "rows", pack_rows(dataset, 4096), collator)
    padded_batch = next(iter(reference.get_train_dataloader()))
    packed_batch = next(iter(trainer.get_train_dataloader()))
    if mode == "trl":  # one flattened row, no padding at all
        assert packed_batch["input_ids"].numel() == sum(len(ids) for ids in dataset["input_ids"])
    else:  # fewer rows than conversations
        assert len(packed_batch["input_ids"]) < len(RECORDS)
    assert "attention_mask" not in packed_batch and "attention_mask" in padded_batch
    with torch.no_grad():
        expected = model(**padded_batch).loss
        torch.testing.assert_close(reference.compute_loss(model, padded_batch), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(trainer.compute_loss(model, packed_batch), expected, atol=1e-6, rtol=1e-6)


def fake_model(attention, module="transformers.models.qwen2.modeling_qwen2"):
    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    methods = {"set_attn_implementation": set_attn_implementation, "parameters": lambda self: iter(())}
    model = type("Qwen2ForCausalLM", (), {"__module__": module, **methods})()
    model.config = SimpleNamespace(_attn_implementation=attention)
    return model


@pytest.mark.parametrize(
    "attention, packing, expected",
    [
        ("sdpa", None, "rows"),
        ("eager", None, "rows"),
        ("flash_attention_2", None, "trl"),
        ("flex_attention", None, "off"),
        ("sdpa", False, "off"),
        ("flash_attention_2", False, "padding_free"),
        ("flex_attention", True, "rows"),
        ("sdpa", True, "rows"),
    ],
)
def test_packing_default_follows_the_attention_kernel(attention, packing, expected, monkeypatch):
    monkeypatch.setattr(packing_module, "keeps_packed_sequences_apart", lambda model: True)  # no forward in a fake
    args = SFTConfig(output_dir="unused", packing=False, use_cpu=True, max_length=512)
    args.packing = packing
    model = fake_model(attention)
    assert resolve_packing(args, model) == expected
    switched = expected == "rows" and attention == "sdpa"  # packed rows on sdpa attend per conversation
    assert model.config._attn_implementation == ("packed_sdpa" if switched else attention)
    assert args.packing == (expected == "trl")
    assert (args.max_length is None) == (expected == "padding_free")


def test_remote_code_models_are_not_packed_by_default():
    args = SFTConfig(output_dir="unused", use_cpu=True)
    args.packing = None
    assert resolve_packing(args, fake_model("sdpa", module="transformers_modules.someone.modeling")) == "off"


def test_sft_packs_by_default_and_not_when_told(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"问题{i}", "output": "回答" * i} for i in range(1, 9)])
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--max_steps", "1",
            "--template_name", "qwen", "--save_strategy", "no", *FAST_FLAGS]  # fmt: skip
    with caplog.at_level("DEBUG", logger="medicalgpt"):
        supervised_finetuning.main([*argv, "--output_dir", str(tmp_path / "packed"), "--verbose"])
        supervised_finetuning.main(
            [*argv, "--output_dir", str(tmp_path / "padded"), "--packing", "False", "--verbose"]
        )
    assert "Packed 8 conversations into" in caplog.text
    assert "Batches: rows (--packing); attention: packed_sdpa;" in caplog.text
    assert "Batches: off (--packing); attention: sdpa;" in caplog.text


def test_tokenised_sft_data_is_cached_between_runs(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    records = [{**r, "source": f"data.jsonl:{i}"} for i, r in enumerate(RECORDS)] * 10
    template = get_conv_template("qwen")

    def prepare(overwrite=False):
        dataset = prepare_sft_dataset(cache_records(records, overwrite=overwrite), template, tiny_tokenizer, 4096)
        files = [f["filename"] for f in dataset.cache_files]
        return dataset, {path: os.stat(path).st_mtime_ns for path in files}

    first, first_files = prepare()
    assert first_files and all(path.startswith(str(tmp_path / "cache")) for path in first_files)
    second, second_files = prepare()
    assert second_files == first_files  # the same files, not rewritten: read from the cache
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]
    assert first[0]["labels"].count(IGNORE_INDEX) > 0
    _, third_files = prepare(overwrite=True)
    assert third_files != first_files  # --overwrite_cache tokenises again


def test_packed_rows_keep_sdpa_on_gpus(monkeypatch):
    """packed_sdpa is measured on CPU only: training on a GPU (sdpa without flash-attn) keeps transformers' masked
    rows."""
    monkeypatch.setattr(packing_module, "keeps_packed_sequences_apart", lambda model: True)
    args = SFTConfig(output_dir="unused", use_cpu=True, max_length=512)
    args.packing = None
    monkeypatch.setattr(type(args), "device", property(lambda self: torch.device("cuda", 0)))
    model = fake_model("sdpa")
    assert resolve_packing(args, model) == "rows" and model.config._attn_implementation == "sdpa"
