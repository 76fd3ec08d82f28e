import json

import pytest
import torch

import supervised_finetuning
from medicalgpt.processors.display import format_label_mask
from medicalgpt.processors.sft import tokenize_conversation
from medicalgpt.templates import get_conv_template, template_from_tokenizer
from tests.helpers import CONVERSATION, FAST_FLAGS, REPO, learned_spans, write_jsonl


def chat_messages(record):
    return [{"role": "system", "content": record["system"]}, *record["messages"]]


def decoded_spans(input_ids, labels, tokenizer):
    return [tokenizer.decode(span) for span in learned_spans(input_ids, labels)]


@pytest.mark.parametrize("template_of", [lambda tok: get_conv_template("qwen"), template_from_tokenizer])
def test_ids_match_the_official_chat_template_and_only_answers_are_learned(tiny_tokenizer, template_of):
    out = tokenize_conversation(CONVERSATION, template_of(tiny_tokenizer), tiny_tokenizer)
    official = tiny_tokenizer.apply_chat_template(chat_messages(CONVERSATION), tokenize=False)
    assert official.endswith("<|im_end|>\n")
    assert out["input_ids"] == tiny_tokenizer(official.removesuffix("\n"))["input_ids"]
    spans = decoded_spans(out["input_ids"], out["labels"], tiny_tokenizer)
    assert spans == ["先测体温，多喝水。<|im_end|>", "Please see a doctor.<|im_end|>"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out["labels"][-1] == im_end and out["dropped_turns"] == 0


def test_train_on_inputs_learns_every_token(tiny_tokenizer):
    out = tokenize_conversation(CONVERSATION, get_conv_template("qwen"), tiny_tokenizer, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


def test_truncation_drops_whole_turns_never_part_of_an_answer(tiny_tokenizer):
    template = get_conv_template("qwen")
    full = tokenize_conversation(CONVERSATION, template, tiny_tokenizer)
    first_turn_only = tokenize_conversation(
        CONVERSATION, template, tiny_tokenizer, max_length=len(full["input_ids"]) - 1
    )
    assert first_turn_only["dropped_turns"] == 1
    assert decoded_spans(first_turn_only["input_ids"], first_turn_only["labels"], tiny_tokenizer) == [
        "先测体温，多喝水。<|im_end|>"
    ]
    too_long = tokenize_conversation(CONVERSATION, template, tiny_tokenizer, max_length=10, overlong="drop")
    assert too_long["input_ids"] == [] and too_long["dropped_turns"] == 2


def test_label_mask_rendering_marks_learned_text(tiny_tokenizer):
    out = tokenize_conversation(CONVERSATION, get_conv_template("qwen"), tiny_tokenizer)
    shown = format_label_mask(out["input_ids"], out["labels"], tiny_tokenizer)
    assert "<|im_start|>assistant\n[LEARN]先测体温，多喝水。<|im_end|>[/LEARN]\n<|im_start|>user" in shown


def tutorial_sft_argv(model_dir, output_dir, data_dir):
    """The tutorial's SFT command with the model path pointed at the tiny model and a few steps on CPU."""
    return [
        "--model_name_or_path", model_dir, "--train_file_dir", data_dir, "--validation_file_dir", data_dir,
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--do_train", "--do_eval",
        "--template_name", "qwen", "--use_peft", "True", "--max_train_samples", "1000", "--max_eval_samples", "10",
        "--model_max_length", "4096", "--num_train_epochs", "1", "--learning_rate", "2e-5", "--warmup_ratio", "0.05",
        "--weight_decay", "0.05", "--logging_strategy", "steps", "--logging_steps", "10", "--eval_steps", "50",
        "--eval_strategy", "steps", "--save_steps", "500", "--save_strategy", "steps", "--save_total_limit", "13",
        "--gradient_accumulation_steps", "8", "--preprocessing_num_workers", "1", "--output_dir", output_dir,
        "--overwrite_output_dir", "--ddp_timeout", "30000", "--logging_first_step", "True", "--target_modules", "all",
        "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--torch_dtype", "bfloat16", "--bf16",
        "--device_map", "auto", "--report_to", "tensorboard", "--ddp_find_unused_parameters", "False",
        "--gradient_checkpointing", "True", "--cache_dir", "./cache", "--flash_attn", "True", "--max_steps", "2",
    ]  # fmt: skip


def test_tutorial_sft_command_trains_an_adapter_that_loads(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "outputs-sft-qwen-v1"
    supervised_finetuning.main(tutorial_sft_argv(tiny_model_dir, str(out), str(REPO / "data" / "finetune")))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero: training must move it"


QA_PAIRS = [
    ("感冒了怎么办？", "多休息，多喝水。"),
    ("高血压吃什么药？", "请遵医嘱服用降压药。"),
    ("What helps a sore throat?", "Warm water and rest."),
    ("发烧几天要去医院？", "超过三天请就医。"),
]


def test_full_sft_then_greedy_generation_reproduces_the_answers(tiny_model_dir, tmp_path):
    """Training and inference agree on the template and the stop token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA_PAIRS])
    out = tmp_path / "sft-full"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train"]
    argv += [
        "--template_name",
        "qwen",
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "60",
        "--learning_rate",
        "3e-3",
    ]
    argv += ["--per_device_train_batch_size", "4", "--save_strategy", "no", "--logging_steps", "10", *FAST_FLAGS]
    supervised_finetuning.main(argv)

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    template = get_conv_template("qwen")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for question, answer in QA_PAIRS:
        prompt = template.get_prompt([[question, ""]])
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=im_end)
        new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
        assert new_tokens[-1] == im_end, "generation must stop at the template's end-of-turn token"
        assert tokenizer.decode(new_tokens[:-1]) == answer


def test_sft_on_a_pt_adapter_chains_and_loads_whole(tiny_model_dir, tmp_path):
    """The tutorial trains SFT on PT's output: an adapter directory. The SFT adapter records it as its base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import pretraining
    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model

    pt_data = tmp_path / "pt.txt"
    pt_data.write_text("\n".join(f"第{i}条：发热时多喝水。" for i in range(20)), encoding="utf-8")
    pt_out, sft_out = tmp_path / "pt", tmp_path / "sft"
    common = ["--do_train", "--use_peft", "True", "--max_steps", "3", "--learning_rate", "1e-2", *FAST_FLAGS]
    pretraining.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pt_data), "--block_size", "16",
                      "--output_dir", str(pt_out), *common])  # fmt: skip
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "发烧怎么办？", "output": "多喝水。"}] * 4)
    supervised_finetuning.main(["--model_name_or_path", str(pt_out), "--train_file_dir", str(sft_data),
                                "--template_name", "qwen", "--output_dir", str(sft_out), *common])  # fmt: skip
    assert json.loads((sft_out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(pt_out)

    by_hand = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), pt_out
    ).merge_and_unload()
    by_hand = PeftModel.from_pretrained(by_hand, sft_out).merge_and_unload()
    chained = load_model(ModelArguments(model_name_or_path=str(sft_out)))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected, got, untouched = by_hand(ids).logits, chained(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, untouched, atol=1e-4)


def test_dataset_name_loads_a_local_dataset_folder_through_the_validator(tiny_model_dir, tmp_path):
    folder = tmp_path / "my_dataset"
    write_jsonl(folder / "train.jsonl", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(6)])
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(folder), "--do_train", "--max_steps", "1"]
    supervised_finetuning.main([*argv, "--per_device_train_batch_size", "6", "--output_dir", str(out), *FAST_FLAGS])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


UPSTREAM_SFT = REPO.parent / "shared" / "data" / "upstream" / "sft"


@pytest.mark.skipif(not UPSTREAM_SFT.is_dir(), reason="upstream sample data not present")
def test_upstream_sft_files_tokenise_with_tool_calls(tiny_tokenizer):
    import datasets

    from medicalgpt.data.validate import find_data_files, load_records
    from medicalgpt.processors.sft import prepare_sft_dataset

    records = load_records(find_data_files(str(UPSTREAM_SFT), "sft"), "sft", skip_invalid=True)
    assert len(records) == 300 + 1000 + 999  # one upstream record has no answer at all: reported, skipped
    tool_records = [r for r in records if any(m["role"] == "function_call" for m in r["messages"])]
    assert tool_records
    dataset = prepare_sft_dataset(datasets.Dataset.from_list(records), get_conv_template("qwen"), tiny_tokenizer, 8192)
    assert len(dataset) == len(records)
    first_tool = prepare_sft_dataset(datasets.Dataset.from_list(tool_records[:1]), get_conv_template("qwen"),
                                     tiny_tokenizer, 8192)[0]  # fmt: skip
    assert "[LEARN]<tool_call>\n{" in format_label_mask(first_tool["input_ids"], first_tool["labels"], tiny_tokenizer)


def test_qlora_4bit_trains_the_adapter(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "output": a} for q, a in QA_PAIRS])
    out = tmp_path / "qlora"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--qlora", "True"]
    argv += ["--template_name", "qwen", "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-2"]
    supervised_finetuning.main([*argv, "--save_strategy", "no", *FAST_FLAGS])
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)


def test_unknown_template_is_a_usage_error_listing_the_known_ones(tiny_model_dir, tmp_path):
    from medicalgpt.errors import UsageError

    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "头痛？", "output": "休息。"}])
    with pytest.raises(UsageError, match="qwen"):
        supervised_finetuning.main(
            [
                "--model_name_or_path",
                tiny_model_dir,
                "--train_file_dir",
                str(data),
                "--do_train",
                "--template_name",
                "qwen25",
                "--output_dir",
                str(tmp_path / "out"),
                *FAST_FLAGS,
            ]
        )
    assert not (tmp_path / "out").exists()
