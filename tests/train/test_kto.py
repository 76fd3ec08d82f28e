"""KTO: records with one answer and a boolean label (and preference pairs split in two) tokenised exactly as DPO
tokenises pairs, bad files refused by path and line before anything is written, the KL answers trl's trainer reads,
learning a preference the model did not have, and run_kto.sh chained on the SFT adapter."""

import json

import pytest

import kto_training
import validate_jsonl
from medicalgpt.errors import DataValidationError
from medicalgpt.processors.kto import tokenize_unpaired
from medicalgpt.processors.preference import tokenize_preference
from medicalgpt.templates import get_conv_template
from tests.helpers import FAST_FLAGS, REPO, SYMPTOMS, doctor_pairs, logprob_margin, write_doctor_data, write_jsonl

CONTEXT = {"messages": [{"role": "user", "content": "小孩发烧怎么办？"}], "system": None, "tools": None}


def unpaired(pairs):
    """Each pair as two KTO records of their own, one per answer, in the prompt/completion/label shape."""
    records = []
    for pair in pairs:
        records.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        records.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return records


def test_an_answer_is_tokenised_as_a_dpo_pair_answer(tiny_tokenizer):
    template = get_conv_template("qwen")
    record = {**CONTEXT, "completion": "不用管。", "label": False, "rejected": None}
    [example] = tokenize_unpaired(record, template, tiny_tokenizer, 1024, 512)
    pair = tokenize_preference({**CONTEXT, "chosen": "不用管。", "rejected": "x"}, template, tiny_tokenizer, 1024, 512)
    assert example["prompt_ids"] == pair["prompt_ids"]
    assert example["completion_ids"] == pair["chosen_ids"]
    assert tiny_tokenizer.decode(example["completion_ids"]) == "不用管。<|im_end|>"
    assert example["label"] is False and example["truncated"] is False


def test_a_preference_pair_is_one_desirable_and_one_undesirable_example(tiny_tokenizer):
    template = get_conv_template("qwen")
    record = {**CONTEXT, "completion": "先测体温。", "label": True, "rejected": "不用管。"}
    chosen, rejected = tokenize_unpaired(record, template, tiny_tokenizer, 1024, 2)
    assert [chosen["label"], rejected["label"]] == [True, False]
    assert chosen["prompt_ids"] == rejected["prompt_ids"]
    full = tokenize_preference({**CONTEXT, "chosen": "先测体温。", "rejected": "不用管。"}, template, tiny_tokenizer,
                               1024, 512)  # fmt: skip
    assert chosen["completion_ids"] == full["chosen_ids"][:2]
    assert rejected["completion_ids"] == full["rejected_ids"][:2]
    assert [chosen["truncated"], rejected["truncated"]] == [True, False], "a cut record is counted once"


BAD_LINES = [
    {"prompt": "头痛怎么办？", "completion": "多休息，不缓解请就医。", "label": True},
    {"prompt": "头痛怎么办？", "completion": "忍着。"},
    {"prompt": "头痛怎么办？", "completion": "忍着。", "label": "false"},
    {"conversations": [{"from": "human", "value": "咳嗽"}, {"from": "gpt", "value": "多喝水"},
                       {"from": "human", "value": "还咳"}], "label": True},
    {"prompt": "头痛怎么办？", "completion": "忍着。", "label": None},
    {"prompt": "头痛怎么办？", "chosen": "就医。", "rejected": "忍着。", "label": False},
]  # fmt: skip
BAD_ERRORS = [
    "{path}:2: error: label: missing: true for a desirable answer, false for an undesirable one",
    "{path}:3: error: label: expected true or false, got string 'false'",
    "{path}:4: error: conversations[2]: the conversation ends with a user turn (human): there is no answer to judge",
    "{path}:5: error: label: null: true for a desirable answer, false for an undesirable one",
    "{path}:6: error: label: a preference pair takes no label (its chosen answer is desirable, its rejected one "
    "undesirable): drop the label, or give each answer as a record of its own",
]


def test_bad_kto_data_is_refused_by_path_and_line_and_nothing_is_written(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as error:
        kto_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(bad), "--do_train",
                           "--output_dir", str(out), *FAST_FLAGS])  # fmt: skip
    assert str(error.value).splitlines()[: len(BAD_ERRORS)] == [line.format(path=bad) for line in BAD_ERRORS]
    assert not out.exists()


def test_validate_jsonl_checks_kto_files(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    assert validate_jsonl.main([str(bad), "--stage", "kto", "--quiet"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[: len(BAD_ERRORS)] == [line.format(path=bad) for line in BAD_ERRORS]
    assert validate_jsonl.main([str(REPO / "data" / "kto"), "--stage", "kto"]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out.splitlines()[-1]


def test_the_trainer_reads_each_example_with_its_batch_neighbours_answer_for_the_kl_term(tiny_model_dir, tmp_path):
    """PreTokenizedKTOTrainer overrides trl 1.16's private `_prepare_dataset`: the columns the collator reads and the
    KL answers, rotated within each batch of --per_device_train_batch_size, are what trl would have built."""
    from trl import KTOConfig

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model, load_tokenizer
    from medicalgpt.processors.kto import prepare_unpaired_dataset
    from medicalgpt.train.records import cache_records
    from medicalgpt.train.trainers import PreTokenizedKTOTrainer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir))
    records = [{**CONTEXT, "completion": f"答案{i}", "label": i % 2 == 0, "rejected": None} for i in range(5)]
    dataset = prepare_unpaired_dataset(cache_records(records), get_conv_template("qwen"), tokenizer, 64, 16)
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=False, report_to="none")
    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    reference = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    trainer = PreTokenizedKTOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                                     processing_class=tokenizer)  # fmt: skip
    data = trainer.train_dataset
    assert set(data.column_names) == {"prompt_ids", "completion_ids", "label", "KL_completion_ids"}
    answers = data["completion_ids"]
    assert data["KL_completion_ids"] == [answers[1], answers[0], answers[3], answers[2], answers[4]]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].tolist() == [True, False]
    assert batch["KL_input_ids"][0].tolist()[: len(dataset[0]["prompt_ids"])] == dataset[0]["prompt_ids"]


def test_kto_learns_to_prefer_seeing_a_doctor_from_answers_judged_one_at_a_time(tiny_model_dir, tiny_tokenizer,
                                                                                tmp_path):  # fmt: skip
    _, held_out = write_doctor_data(tmp_path / "pairs")
    train = write_jsonl(tmp_path / "kto" / "judged.jsonl", unpaired(doctor_pairs(SYMPTOMS[:8], seed=0)))
    out = tmp_path / "kto-out"
    kto_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(train), "--do_train",
                       "--template_name", "qwen", "--use_peft", "True", "--lora_rank", "16", "--learning_rate", "5e-3",
                       "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--output_dir", str(out),
                       "--save_strategy", "no", "--logging_steps", "5", *FAST_FLAGS])  # fmt: skip
    before = logprob_margin(tiny_model_dir, held_out, tiny_tokenizer)
    after = logprob_margin(out, held_out, tiny_tokenizer)
    print(f"kto: held-out log-prob margin {before:.2f} -> {after:.2f}")
    assert after > before + 3.0, (before, after)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    margins = [entry["rewards/margins"] for entry in history if "rewards/margins" in entry]
    assert margins[-1] > margins[0], margins
