"""bench/flops.py's FLOP count and bench/peak.py's measured peak, on the tiny model's shapes."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench import flops, peak, sft_throughput

# hidden 64, attention 4 x 16, key/value 2 x 16, MLP 128, 2 layers, vocabulary 3,000
CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 3000,
}  # fmt: skip


def test_flops_of_full_and_lora_training_by_hand():
    # per layer q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 3 x 64x128 = 36,864; 2 layers: 73,728
    # LoRA rank 8: 8 x ((64+64) + (64+32) x 2 + (64+64) + (64+128) x 3) = 8,192 per layer: 16,384
    assert flops.parameter_counts(CONFIG) == {"body": 73_728, "head": 192_000, "lora": 16_384}
    pairs = flops.attention_pairs([3, 5])  # 1+2+3 and 1+2+3+4+5 causal pairs
    assert pairs == 21
    attention = 12 * 2 * 64 * 21  # 32,256
    # 8 real tokens, 4 of them learned (the LM head runs there only)
    assert flops.training_flops(CONFIG, "full", 8, 4, pairs) == 6 * 73_728 * 8 + 6 * 192_000 * 4 + attention
    assert flops.training_flops(CONFIG, "full", 8, 4, pairs) == 8_179_200
    assert flops.training_flops(CONFIG, "lora", 8, 4, pairs) == 2_359_296 + 3_072_000 + 786_432 + attention
    assert flops.training_flops(CONFIG, "lora", 8, 4, pairs) == 6_249_984
    assert flops.mfu(8_179_200, 2.0, 0.004) == pytest.approx(8_179_200 / 2.0 / 4e6)
    with pytest.raises(ValueError, match="full or lora"):
        flops.training_flops(CONFIG, "qlora", 8, 4, pairs)


def test_parameter_counts_match_the_model_and_peft(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = flops.read_config(tiny_model_dir)
    counts = flops.parameter_counts(config, lora_rank=8)
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    assert counts["body"] + counts["head"] == linear  # the tied head counts once, as the product it runs
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert counts["lora"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_smollm2_shapes():
    smollm2 = {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    }  # fmt: skip
    assert flops.parameter_counts(smollm2) == {"body": 106_168_320, "head": 28_311_552, "lora": 2_442_240}
    # one conversation of 1,000 tokens, 600 learned: 6N per token, the head at the learned ones, causal attention
    full = flops.training_flops(smollm2, "full", 1000, 600, flops.attention_pairs([1000]))
    assert full == 6 * 106_168_320 * 1000 + 6 * 28_311_552 * 600 + 12 * 30 * 576 * 500_500


def test_peak_json_at_tiny_shapes(tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    argv = ["--model", tiny_model_dir, "--tokens", "16", "--threads", "1", "--warmup", "1", "--repeats", "2"]
    results = peak.main([*argv, "--square", "32", "--json", str(tmp_path / "peak.json")])
    assert torch.get_num_threads() == threads  # restored
    assert json.loads((tmp_path / "peak.json").read_text()) == results
    vocab = flops.read_config(tiny_model_dir)["vocab_size"]
    shapes = {(row["layer"], tuple(row["tokens_in_out"])) for row in results["results"]}
    # k/v and gate/up share shapes: one row each
    expected = {("q_proj", (16, 64, 64)), ("k_proj", (16, 64, 32)), ("gate_proj", (16, 64, 128))}
    assert shapes == expected | {("down_proj", (16, 128, 64)), ("lm_head", (16, 64, vocab))}
    assert len(results["results"]) == 5 * 3 * 2  # shapes x (forward, input and weight gradient) x dtypes
    assert {(row["kernel"], row["dtype"]) for row in results["results"]} == {
        (kernel, dtype) for kernel in peak.KERNELS for dtype in ("float32", "bfloat16")
    }
    for row in results["results"]:
        tokens, fan_in, fan_out = row["tokens_in_out"]
        assert row["gflop"] == round(2 * tokens * fan_in * fan_out / 1e9, 3)
        assert row["spread_gflops"][0] <= row["median_gflops"] <= row["spread_gflops"][1]
    assert [(row["layer"], row["tokens_in_out"]) for row in results["square"]] == [("square", [32, 32, 32])] * 2
    best = max((row for row in results["results"] if row["dtype"] == "float32"), key=lambda row: row["median_gflops"])
    assert results["peak_for_mfu"]["gflops"] == best["median_gflops"] == results["best_at_model_shapes"]["float32"]
    assert (results["peak_for_mfu"]["layer"], results["peak_for_mfu"]["kernel"]) == (best["layer"], best["kernel"])
    assert results["peak_for_mfu"]["gflops_per_cpu_s_x_threads"] == best["gflops_per_cpu_s_x_threads"]


def test_the_bench_states_mfu_per_row_against_the_peak(tiny_model_dir):
    rows = [
        {"contender": "ours_chunked", "method": "lora", "real_tokens": 8, "learned_tokens": 4, "median_train_s": 2.0,
         "median_train_cpu_s": 3.0},
        {"contender": "upstream", "method": "full", "real_tokens": 8, "learned_tokens": 4, "median_train_s": 4.0,
         "median_train_cpu_s": 8.0},
    ]  # fmt: skip
    peak = {"gflops": 0.004, "gflops_per_cpu_s_x_threads": 0.008}  # the wall-clock rate halved by other jobs
    sft_throughput.add_mfu(rows, CONFIG, [3, 5], peak=peak, threads=2)
    assert (rows[0]["tflop"], rows[0]["flop_per_real_token"]) == (round(6_249_984 / 1e12, 3), 6_249_984 // 8)
    assert rows[0]["mfu"] == round(6_249_984 / 2.0 / 4e6, 4)
    assert rows[0]["mfu_cpu"] == round(6_249_984 / 1.5 / 8e6, 4)  # CPU seconds over 2 threads, the peak's CPU rate
    assert rows[1]["mfu"] == round(8_179_200 / 4.0 / 4e6, 4)
