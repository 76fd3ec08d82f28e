"""bench/sft_throughput.py: the counts that make its comparison one of equal work."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer, Trainer

from bench import sft_throughput
from bench.common import median_and_spread


def test_training_batches_are_counted_without_padding(monkeypatch):
    monkeypatch.setattr(Trainer, "training_step", lambda self, model, inputs, *args: torch.tensor(0.0))
    monkeypatch.setattr(Trainer, "train", Trainer.train)  # restored after the test, like training_step
    counts = {"real": 0, "learned": 0, "spans": 0, "forward_backward_s": 0.0}
    sft_throughput.count_training_batches(counts, pad_token_id=0)
    pad, ignore = 0, -100
    batch = {  # two packed conversations then padding, and one padded conversation with two answers
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, pad, pad], [5, 6, 7, 8, 9, 10, 11, pad, pad, pad]]),
        "labels": torch.tensor([[ignore, ignore, 7, 8, ignore, ignore, 6, 7, ignore, ignore],
                                [ignore, 6, ignore, ignore, 9, 10, ignore, ignore, ignore, ignore]]),
        "attention_mask": torch.ones(2, 10, dtype=torch.long),  # LLaMA-Factory's packing marks padding 1
    }  # fmt: skip
    Trainer.training_step(None, None, batch)
    assert {key: counts[key] for key in ("real", "learned", "spans")} == {"real": 15, "learned": 7, "spans": 4}
    assert counts["forward_backward_s"] > 0


def test_groups_expand_to_one_row_per_change():
    assert sft_throughput.contender_names("upstream,ours,llamafactory") == [
        "upstream", "ours_padded", "ours_padding_free", "ours_packed", "ours_chunked",
        "llamafactory_unpacked", "llamafactory_packing", "llamafactory_neat_packing",
    ]  # fmt: skip
    assert median_and_spread([3.0, 1.0, 10.0, 2.0]) == (2.5, 1.0, 10.0)


def test_a_model_padding_with_its_end_of_turn_is_benched_with_a_pad_token_of_its_own(tiny_model_dir, tmp_path):
    model = tmp_path / "pads-with-im-end"  # like SmolLM2-Instruct
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token, tokenizer.unk_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.save_pretrained(model)

    folder = sft_throughput.with_distinct_pad_token(str(model), str(tmp_path / "bench-model"))
    benched = AutoTokenizer.from_pretrained(folder)
    assert (benched.pad_token, benched.pad_token_id) == (
        "<|endoftext|>",
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["pad_token_id"] == benched.pad_token_id
    assert os.path.islink(os.path.join(folder, "model.safetensors"))  # the weights are linked, not copied
    assert AutoTokenizer.from_pretrained(model).pad_token == "<|im_end|>"  # the model itself is left as it was
    assert sft_throughput.with_distinct_pad_token(tiny_model_dir, str(tmp_path / "unused")) == tiny_model_dir


def test_spread_picks_conversations_over_the_whole_length_distribution(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    lengths = [1, 40, 2, 30, 3, 20, 4, 10, 5, 50]  # words in the answer, in the file's order
    turns = [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok " * n}] for n in lengths]
    records = [{"conversations": conversation} for conversation in turns]
    data.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")

    first, first_tokens = sft_throughput.select_conversations(str(data), tiny_model_dir, 512, 3)
    spread, spread_tokens = sft_throughput.select_conversations(str(data), tiny_model_dir, 512, 4, pick="spread")
    answer_words = lambda lines: [json.loads(line)["conversations"][1]["value"].count("ok") for line in lines]  # noqa: E731
    assert answer_words(first) == [1, 40, 2]
    # sorted by length 1 2 3 4 5 10 20 30 40 50: the shortest, the longest and ranks 3 and 6 between them
    assert answer_words(spread) == [1, 20, 4, 50]  # in the file's order
    assert spread_tokens[0] < spread_tokens[2] < spread_tokens[1] < spread_tokens[3]
    all_lines, all_tokens = sft_throughput.select_conversations(str(data), tiny_model_dir, 512, None)
    assert len(all_lines) == 10 and first_tokens == all_tokens[:3]


def test_full_parameter_runs_train_all_weights_in_every_contender(tmp_path):
    class Args:
        batch_size, max_length = 8, 1024

    flags = sft_throughput.shared_flags(Args, "model", "data", "out", "full")
    assert flags[flags.index("--use_peft") + 1] == "False"
    lora = sft_throughput.shared_flags(Args, "model", "data", "out", "lora")
    assert lora[lora.index("--use_peft") + 1] == "True"
    import yaml

    for method, expected in (("full", None), ("lora", "all")):
        path = sft_throughput.llamafactory_config(Args, "model", str(tmp_path), str(tmp_path / method), {}, method)
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        assert (config["finetuning_type"], config.get("lora_target"), config["cutoff_len"]) == (method, expected, 1024)
    assert sft_throughput.method_names("lora,full") == ["lora", "full"]
    assert sft_throughput.contender_names("best") == ["upstream", "ours_chunked", "llamafactory_neat_packing"]


def test_profile_of_our_steps_follows_the_method(tiny_model_dir, tmp_path, capsys):
    """bench/profile_sft.py profiles what training runs: LoRA's dropout masks (the fused layer's random bits, not
    peft's bernoulli_) only with --method lora; and Trainer.training_step is put back after."""
    from bench import profile_sft

    data = tmp_path / "sft.jsonl"
    turns = [[{"from": "human", "value": "q " * n}, {"from": "gpt", "value": "ok " * n}] for n in (3, 5, 8, 13, 21)]
    data.write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns), encoding="utf-8")
    step = Trainer.training_step
    tops = {}
    for method in ("lora", "full"):
        profile_sft.main(["--model", tiny_model_dir, "--data", str(data), "--max_length", "128", "--limit", "5",
                          "--batch_size", "1", "--steps", "1", "--method", method, "--top", "1000"])  # fmt: skip
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["profiled_steps"] == 1
        tops[method] = report["top"]
    assert Trainer.training_step is step
    assert "aten::random_" in tops["lora"] and "aten::random_" not in tops["full"]
    assert not any("bernoulli" in name for top in tops.values() for name in top)


def test_packed_attention_ab_times_both_attentions_on_the_same_packed_rows(tiny_model_dir, tmp_path, capsys):
    from bench import packed_attention_ab

    data = tmp_path / "sft.jsonl"
    turns = [[{"from": "human", "value": "q " * n}, {"from": "gpt", "value": "ok " * n}] for n in (3, 5, 8, 13, 21)]
    data.write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns), encoding="utf-8")
    argv = ["--model", tiny_model_dir, "--data", str(data), "--rows", "1", "--max_length", "160", "--repeats", "2"]
    result = packed_attention_ab.main(argv)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["conversations"] > 1  # a packed row, split by packed_sdpa
    assert {len(times) for times in result["cpu_s_all"].values()} == {2}
    assert abs(result["loss"]["sdpa"] - result["loss"]["packed_sdpa"]) < 1e-5


def test_lm_loss_ab_times_both_paths_on_the_same_head_and_they_agree(capsys):
    """bench/lm_loss_ab.py: both chunked-loss paths, full and LoRA, several chunks; the same loss and gradients."""
    from bench import lm_loss_ab

    lm_loss_ab.main(["--vocab", "2000", "--hidden", "16", "--tokens", "40000", "--repeats", "2", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["chunk_rows"] == 2**25 // 2000 and report["tokens"] > 2 * report["chunk_rows"]
    for method in ("full", "lora"):
        row = report[method]
        assert set(row["cpu_s_median"]) == {"checkpointed", "in_forward"}
        assert row["max_relative_difference"] < 1e-5


def test_attention_kernels_times_flash_and_math_per_length(capsys):
    """GFLOP/s from bench/flops.py's attention count (causal half, backward 2.5x forward) over the timed seconds."""
    from bench import attention_kernels

    argv = ["--heads", "4", "--kv_heads", "2", "--head_dim", "8", "--lengths", "64,128", "--repeats", "1"]
    attention_kernels.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert [row["tokens"] for row in report["rows"]] == [64, 128]
    for row in report["rows"]:
        for kernel in ("flash", "math"):
            timing = row[kernel]
            flops = 2 * 2 * row["tokens"] ** 2 / 2 * 4 * 8 * 3.5 / 1e9
            seconds = (timing["forward_ms"] + timing["backward_ms"]) / 1e3
            assert timing["gflops"] == pytest.approx(flops / seconds, rel=0.05)
