"""--streaming True (medicalgpt/train/streaming.py): PT and SFT train for --max_steps on a stream of the same tokens as
the cached path; validation errors still name `path:line` (or `dataset[split]:row`) before training; no --max_steps is
a usage error; trl's own passes over already-prepared SFT data are skipped; under torchrun the ranks share the one
stream record by record, whatever the files."""

import json

import datasets
import pytest
from transformers import Trainer
from trl import SFTTrainer

import pretraining
import supervised_finetuning
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.train.streaming import stream_file_records
from tests.helpers import FAST_FLAGS, TORCHRUN, free_port, global_step, run, write_jsonl
from tests.record_batches import training_step_spy

QA = [(f"第{i}个问题：发烧{i}天了怎么办？", f"第{i}个回答：多喝水，休息{i}天，不退烧就去医院。") for i in range(8)]


def record_batches(monkeypatch):
    """Every training batch as a sorted list of its unpadded (input_ids, labels) sequences."""
    seen = []
    original = Trainer.training_step

    def spy(self, model, inputs, *args, **kwargs):
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask = inputs.get("attention_mask")
        for row in range(ids.shape[0]):
            keep = mask[row].bool() if mask is not None else slice(None)
            seen.append((tuple(ids[row][keep].tolist()), tuple(labels[row][keep].tolist())))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", spy)
    return seen


def test_streaming_sft_trains_max_steps_on_the_same_conversations(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in QA])
    prepared = []  # trl's _prepare_dataset (trl 1.16, private): our data is prepared, so it must not run
    original_prepare = SFTTrainer._prepare_dataset

    def prepare_spy(self, *args, **kwargs):
        prepared.append(args)
        return original_prepare(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", prepare_spy)
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--template_name"]
    argv += ["qwen", "--packing", "False", "--max_steps", "4", "--per_device_train_batch_size", "2", *FAST_FLAGS]
    runs = {}
    for streaming in ("False", "True"):
        batches = record_batches(monkeypatch)
        out = tmp_path / f"out-{streaming}"
        supervised_finetuning.main([*argv, "--streaming", streaming, "--output_dir", str(out)])
        assert global_step(out) == 4
        runs[streaming] = sorted(batches)
    assert len(runs["True"]) == 8 and len(set(runs["True"])) == 8  # each conversation once: 4 steps of 2
    assert runs["True"] == runs["False"]
    assert all(-100 in labels and any(t != -100 for t in labels) for _, labels in runs["True"])  # answers only
    assert prepared == []


def test_streaming_sft_packs_rows_on_the_fly(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in QA])
    positions = []
    original = Trainer.training_step
    monkeypatch.setattr(
        Trainer,
        "training_step",
        lambda self, m, inputs, *a: positions.append(inputs["position_ids"]) or original(self, m, inputs, *a),
    )
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--streaming", "True"]
    argv += ["--template_name", "qwen", "--packing", "True", "--max_steps", "1", "--model_max_length", "1024"]
    argv += ["--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "out"), *FAST_FLAGS]
    supervised_finetuning.main(argv)
    [row] = positions  # all eight conversations (~70 tokens each) in one packed row, positions restarting
    assert row.shape[0] == 1 and 500 < row.shape[1] <= 1024 and (row == 0).sum() == 8
    assert global_step(tmp_path / "out") == 1


def test_streaming_pt_trains_on_the_same_blocks(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "pt.txt"
    data.write_text(
        "\n".join(f"第{i}篇：发热是人体对感染的反应，体温超过三十八度要多喝水。" for i in range(12)), "utf-8"
    )
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train", "--block_size", "64"]
    argv += ["--per_device_train_batch_size", "1", *FAST_FLAGS]
    runs = {}
    for streaming in ("False", "True"):
        batches = record_batches(monkeypatch)
        out = tmp_path / f"out-{streaming}"
        steps = ["--max_steps", str(len(runs["False"]))] if streaming == "True" else ["--num_train_epochs", "1"]
        pretraining.main([*argv, *steps, "--streaming", streaming, "--output_dir", str(out)])
        runs[streaming] = sorted(batches)
    assert len(runs["False"]) > 3 and global_step(tmp_path / "out-True") == len(runs["False"])
    assert runs["True"] == runs["False"]


def test_streaming_needs_max_steps(tiny_model_dir, tmp_path):
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(tmp_path), "--do_train"]
    with pytest.raises(UsageError, match="--streaming True needs --max_steps"):
        pretraining.main([*argv, "--streaming", "True", "--output_dir", str(tmp_path / "out"), *FAST_FLAGS])


def test_streamed_files_are_validated_before_training(tmp_path, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "only q"}])
    with pytest.raises(DataValidationError) as raised:
        stream_file_records([str(path)], "sft")
    assert [str(e) for e in raised.value.errors] == [f"{path}:2: error: output: missing"]
    with caplog.at_level("INFO"):
        stream = stream_file_records([str(path)], "sft", skip_invalid=True)
    assert "skipped 1 invalid records" in caplog.text and "Validated 1 records to stream (1 skipped)" in caplog.text
    assert [row["source"] for row in stream] == [f"{path}:1"]


def test_streamed_hub_rows_are_validated_as_they_are_read(monkeypatch):
    from medicalgpt.train.streaming import _hub_records

    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}, {"instruction": "q2", "output": "b"}]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows).to_iterable_dataset()
    )
    with pytest.raises(DataValidationError, match=r"^demo\[train\]:2: error: output: missing"):
        list(_hub_records("demo", None, "train", "sft", skip_invalid=False))
    kept = list(_hub_records("demo", None, "train", "sft", skip_invalid=True))
    assert [row["source"] for row in kept] == ["demo[train]:1", "demo[train]:3"]


# -- several processes: the ranks share one stream record by record ------------------------------------------------


def seen_by_two_ranks(script, argv, tmp_path):
    """`script` under torchrun (2 processes): the sequences each rank trained on (tests/record_batches.py). A rank
    left without data used to stop while the other waited for it: the timeout turns such a hang into a failure."""
    seen = tmp_path / "seen"
    seen.mkdir()
    launcher = [*TORCHRUN, "--master_port", str(free_port()), "tests/record_batches.py", str(seen), script]
    result = run([*launcher, *argv], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((seen / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def seen_by_one_process(main, argv, monkeypatch):
    seen = []
    monkeypatch.setattr(Trainer, "training_step", training_step_spy(seen))
    main(argv)
    return seen


def sft_stream_argv(model, data, output_dir, steps, batch_size, *extra):
    return ["--model_name_or_path", model, "--train_file_dir", str(data), "--do_train",
            "--template_name", "qwen", "--packing", "False", "--streaming", "True", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch_size), "--save_strategy", "no", "--output_dir",
            str(output_dir), *FAST_FLAGS, *extra]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("second_file", ["4 records", "only invalid and overlong records"])
def test_streaming_sft_under_torchrun_divides_records_not_files(second_file, tiny_model_dir, tmp_path, monkeypatch):
    """Files of 40 and 4 records (or 40 and one whose records are all skipped: invalid, or too long for
    --overlong drop), 2 ranks x 2 per step for one pass: together the ranks train on exactly the records one process
    x 4 trains on, each once, and both ranks take every step. Divided by file, rank 0 read only the first file and
    rank 1 the second one four times over (or nothing at all, and stopped at step 0 while rank 0 waited)."""
    records = [{"instruction": f"第{i}个问题：咳嗽{i}天了？", "output": f"第{i}个回答：多喝水。"} for i in range(44)]
    write_jsonl(tmp_path / "data" / "a.jsonl", records[:40])
    extra = []
    if second_file == "4 records":
        write_jsonl(tmp_path / "data" / "b.jsonl", records[40:])
    else:
        overlong = {"instruction": "头痛", "output": "请去医院做详细检查，" * 40}
        bad = [{"instruction": "只有问题"}, {"output": "只有回答"}, overlong, overlong]
        write_jsonl(tmp_path / "data" / "b.jsonl", bad)
        extra = ["--skip_invalid_examples", "True", "--overlong", "drop", "--model_max_length", "128"]
    steps = (44 if second_file == "4 records" else 40) // 4
    data = tmp_path / "data"
    argv = sft_stream_argv(tiny_model_dir, data, tmp_path / "one", steps, 4, *extra)
    one = seen_by_one_process(supervised_finetuning.main, argv, monkeypatch)
    argv = sft_stream_argv(tiny_model_dir, data, tmp_path / "two", steps, 2, *extra)
    rank0, rank1 = seen_by_two_ranks("supervised_finetuning.py", argv, tmp_path)
    assert len(rank0) == len(rank1) == 2 * steps
    assert len({tuple(ids) for ids in one}) == len(one) == 4 * steps  # one pass: every record once
    assert sorted(rank0 + rank1) == sorted(one)


@pytest.mark.multiprocess
def test_streaming_pt_under_torchrun_divides_blocks_not_files(tiny_model_dir, tmp_path, monkeypatch):
    """PT: text files of 40 and 4 documents, 2 ranks x 1 block per step: the blocks one process x 2 trains on."""
    data = tmp_path / "data"
    data.mkdir()
    for name, count in (("a.txt", 40), ("b.txt", 4)):
        lines = [f"{name}第{i}篇：发热是人体对感染的反应，体温超过三十八度要多喝水。" for i in range(count)]
        (data / name).write_text("\n".join(lines), encoding="utf-8")

    def argv(output_dir, batch_size):
        return ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train",
                "--block_size", "32", "--streaming", "True", "--max_steps", "8", "--per_device_train_batch_size",
                str(batch_size), "--save_strategy", "no", "--output_dir", str(output_dir), *FAST_FLAGS]  # fmt: skip

    one = seen_by_one_process(pretraining.main, argv(tmp_path / "one", 2), monkeypatch)
    rank0, rank1 = seen_by_two_ranks("pretraining.py", argv(tmp_path / "two", 1), tmp_path)
    assert len(rank0) == len(rank1) == 8 and len({tuple(ids) for ids in one}) == 16
    assert sorted(rank0 + rank1) == sorted(one)


@pytest.mark.multiprocess
def test_streaming_sft_under_torchrun_fills_the_last_batch_with_the_first_records(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    """Files of 1, 0 (blank lines only) and 17 records, 2 ranks x 2 for one pass (5 steps): the ranks train on the
    18 records one process x 4 trains on, plus the pass's first 2 records once more: accelerate completes the last
    global batch (2 records) with the first ones so that every rank takes the same steps (even_batches); one process
    takes a short last batch instead."""
    records = [{"instruction": f"第{i}个问题：咳嗽{i}天了？", "output": f"第{i}个回答：多喝水。"} for i in range(18)]
    write_jsonl(tmp_path / "data" / "a.jsonl", records[:1])
    (tmp_path / "data" / "b.jsonl").write_text("\n\n", encoding="utf-8")
    write_jsonl(tmp_path / "data" / "c.jsonl", records[1:])
    data = tmp_path / "data"
    one_argv = sft_stream_argv(tiny_model_dir, data, tmp_path / "one", 5, 4)
    one = seen_by_one_process(supervised_finetuning.main, one_argv, monkeypatch)
    two_argv = sft_stream_argv(tiny_model_dir, data, tmp_path / "two", 5, 2)
    rank0, rank1 = seen_by_two_ranks("supervised_finetuning.py", two_argv, tmp_path)
    assert len(one) == len({tuple(ids) for ids in one}) == 18 and len(rank0) == len(rank1) == 10
    assert sorted(rank0 + rank1) == sorted(one + one[:2])
