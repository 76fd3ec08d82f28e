import json
import math
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

import pretraining
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.pt import prepare_pretraining_dataset
from tests.helpers import FAST_FLAGS, REPO

DOCS = ["发烧是身体对感染的一种反应。", "Drink water and rest.", "高血压患者应定期测量血压，按时服药。" * 3]


def test_blocks_keep_every_token_and_end_each_document_with_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    blocks = prepare_pretraining_dataset(datasets.Dataset.from_dict({"text": DOCS}), tiny_tokenizer, block_size=16)
    expected_stream = [i for doc in DOCS for i in tiny_tokenizer(doc)["input_ids"] + [eos]]
    lengths = [len(ids) for ids in blocks["input_ids"]]
    assert [i for ids in blocks["input_ids"] for i in ids] == expected_stream
    assert lengths[:-1] == [16] * (len(lengths) - 1) and 0 < lengths[-1] <= 16
    assert len(lengths) == math.ceil(len(expected_stream) / 16)
    assert blocks["labels"] == blocks["input_ids"]


def test_blocks_are_cut_per_thousand_documents_in_one_pass(tiny_tokenizer):
    """Each 1,000 documents end in their own shorter block (PT_MAP_BATCH), with or without --streaming."""
    docs = [f"第{i}段：发烧{i % 7}天，多喝水。" for i in range(2_500)]
    ids = [tiny_tokenizer(doc)["input_ids"] + [tiny_tokenizer.eos_token_id] for doc in docs]
    expected = []
    for start in range(0, len(docs), 1000):
        stream = [i for doc in ids[start : start + 1000] for i in doc]
        expected += [stream[i : i + 64] for i in range(0, len(stream), 64)]
    records = datasets.Dataset.from_dict({"text": docs})
    assert prepare_pretraining_dataset(records, tiny_tokenizer, 64)["input_ids"] == expected
    streamed = prepare_pretraining_dataset(records.to_iterable_dataset(), tiny_tokenizer, 64)
    assert [row["input_ids"] for row in streamed] == expected


def test_short_corpus_still_yields_one_block(tiny_tokenizer):
    blocks = prepare_pretraining_dataset(datasets.Dataset.from_dict({"text": ["短文本"]}), tiny_tokenizer, 512)
    assert len(blocks) == 1
    assert blocks[0]["input_ids"][-1] == tiny_tokenizer.eos_token_id


def tutorial_pt_argv(model_dir, output_dir, data_dir):
    """The tutorial's PT command, model path pointed at the tiny model, with a few steps on CPU."""
    return [
        "--model_name_or_path", model_dir, "--train_file_dir", data_dir, "--validation_file_dir", data_dir,
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--do_train", "--do_eval",
        "--use_peft", "True", "--seed", "42", "--max_train_samples", "10000", "--max_eval_samples", "10",
        "--num_train_epochs", "0.5", "--learning_rate", "2e-4", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
        "--logging_strategy", "steps", "--logging_steps", "10", "--eval_steps", "50", "--eval_strategy", "steps",
        "--save_steps", "500", "--save_strategy", "steps", "--save_total_limit", "13",
        "--gradient_accumulation_steps", "8", "--preprocessing_num_workers", "1", "--block_size", "512",
        "--group_by_length", "True", "--output_dir", output_dir, "--overwrite_output_dir", "--ddp_timeout", "30000",
        "--logging_first_step", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.05", "--torch_dtype", "bfloat16", "--bf16", "--device_map", "auto",
        "--report_to", "tensorboard", "--ddp_find_unused_parameters", "False", "--gradient_checkpointing", "True",
        "--cache_dir", "./cache", "--max_steps", "2",
    ]  # fmt: skip


def test_tutorial_pt_command_trains_a_lora_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "outputs-pt-qwen-v1"
    pretraining.main(tutorial_pt_argv(tiny_model_dir, str(out), str(REPO / "data" / "pretrain")))
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero: training must move it"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    metrics = json.loads((out / "eval_results.json").read_text())
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-6)
    assert list(Path(out, "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert (out / "tokenizer_config.json").exists()


def test_full_pretraining_lowers_loss_and_changes_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "pt"
    data.mkdir()
    (data / "a.txt").write_text("\n".join(DOCS * 4), encoding="utf-8")
    out = tmp_path / "full"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--block_size", "32"]
    argv += ["--output_dir", str(out), "--max_steps", "30", "--learning_rate", "3e-3", "--logging_steps", "1"]
    argv += ["--per_device_train_batch_size", "4", "--save_strategy", "no", *FAST_FLAGS]
    pretraining.main(argv)
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_labels_of_padding_are_ignored(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=IGNORE_INDEX)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["labels"][1].tolist() == [8, IGNORE_INDEX, IGNORE_INDEX]
