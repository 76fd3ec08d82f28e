"""quantize_model.py: NF4 / int8 exports that transformers reloads, their perplexity on evaluate.py's windows and their
memory; the GPTQ path up to gptqmodel's API; the mistakes it refuses before any model loads."""

import importlib.machinery
import json
import sys
import types

import pytest
import torch

import evaluate
import quantize_model
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.eval.perplexity import tokenize_documents
from tests.helpers import REPO, write_jsonl

PPL_FILE = str(REPO / "data" / "eval" / "perplexity.txt")
IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 1200, 64]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def export(capsys, *argv):
    capsys.readouterr()  # what ran before (a training run's logs) is not the printed JSON
    quantize_model.main(list(argv))
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{\n") :])  # after any library's stray print (DeepSpeed's on CPU)


def evaluate_perplexity(model_dir, output_dir):
    evaluate.main(["--task", "perplexity", "--base_model", model_dir, "--data_file", PPL_FILE, "--block_size", "64",
                   "--output_dir", str(output_dir)])  # fmt: skip
    return json.loads((output_dir / "results.json").read_text())


@pytest.mark.parametrize("method, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_export_reloads_quantised_with_evaluate_pys_perplexity_and_less_memory(
    tiny_model_dir, tmp_path, capsys, method, layer
):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"tiny-{method}"
    results = export(capsys, "--model_name_or_path", tiny_model_dir, "--method", method, "--eval_file", PPL_FILE,
                     "--block_size", "64", "--output_dir", str(out))  # fmt: skip

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, as every script loads it
    assert any(type(module).__name__ == layer for module in reloaded.modules())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_4bit"] == (method == "nf4") and config["load_in_8bit"] == (method == "int8")
    assert method != "nf4" or (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == ("nf4", True)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(logits(reloaded), logits(full))  # the weights were really rounded...
    torch.testing.assert_close(logits(reloaded), logits(full), atol=0.15, rtol=0)  # ...and stay close
    assert json.loads((out / "quantize_results.json").read_text()) == results
    assert not (tmp_path / f"tiny-{method}.partial").exists()

    before, after = results["before"], results["after"]
    assert after["memory_bytes"] == reloaded.get_memory_footprint() < before["memory_bytes"]
    assert before["memory_bytes"] == full.get_memory_footprint()
    # the same windows and the same per-token perplexity as `evaluate.py --task perplexity`, before and after
    for figures, model_dir in ((before, tiny_model_dir), (after, str(out))):
        reference = evaluate_perplexity(model_dir, tmp_path / f"eval-{len(figures)}-{model_dir[-4:]}")
        assert figures["tokens"] == reference["tokens"] and figures["block_size"] == 64
        assert figures["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert after["perplexity"] != before["perplexity"]
    assert abs(after["loss"] - before["loss"]) < 0.05


def test_an_adapter_is_merged_in_full_precision_then_quantised(tiny_model_dir, tmp_path, capsys, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model
    from tests.helpers import qa_adapter

    adapter = qa_adapter(tmp_path_factory, tiny_model_dir)
    out = tmp_path / "sft-nf4"
    export(capsys, "--model_name_or_path", adapter, "--method", "nf4", "--output_dir", str(out))
    quantized = logits(AutoModelForCausalLM.from_pretrained(out))
    merged = logits(load_model(ModelArguments(), adapter))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (quantized - merged).norm() < 0.5 * (quantized - base).norm()  # the adapter is in the rounded weights
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # the full-precision merge was removed


def test_mistakes_are_one_line_errors_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from medicalgpt.export import quantize

    missing_model = str(tmp_path / "no-such-model")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="is not empty: choose a new --output_dir or pass --overwrite_output_dir"):
        quantize_model.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(taken)])

    bad = write_jsonl(tmp_path / "ppl.jsonl", [{"text": "ok"}, {"txt": "no text"}])
    with pytest.raises(DataValidationError, match=f"{bad}:2"):
        quantize_model.main(["--model_name_or_path", missing_model, "--method", "nf4", "--eval_file", str(bad),
                             "--output_dir", str(tmp_path / "a")])  # fmt: skip

    monkeypatch.setattr(quantize, "cuda_available", lambda: False)
    monkeypatch.setitem(sys.modules, "gptqmodel", types.ModuleType("gptqmodel"))
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(UsageError, match="--method gptq needs a CUDA GPU"):
        quantize_model.main(["--model_name_or_path", missing_model, "--method", "gptq", "--eval_file", PPL_FILE,
                             "--output_dir", str(tmp_path / "b")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_code:
        quantize_model.main(["--model_name_or_path", missing_model, "--method", "gptq", "--output_dir", "c"])
    assert exit_code.value.code == 2 and "--method gptq needs calibration text" in capsys.readouterr().err

    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"--method int8 needs bitsandbytes: pip install -r requirements-gpu.txt"):
        quantize_model.main(["--model_name_or_path", missing_model, "--method", "int8", "--output_dir", "d"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl.jsonl", "taken"]  # nothing written


def test_a_bitsandbytes_that_cannot_run_on_cpu_names_the_flag_and_the_device(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional

    from medicalgpt.export.quantize import check_bitsandbytes

    def unsupported(*args, **kwargs):
        raise RuntimeError("No kernel for device cpu\nsecond line")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", unsupported)
    with pytest.raises(UsageError) as caught:
        check_bitsandbytes("nf4")
    assert str(caught.value).startswith("--method nf4: bitsandbytes ") and "\n" not in str(caught.value)
    assert "cannot quantise on cpu (No kernel for device cpu)" in str(caught.value)


def test_gptq_calibrates_on_the_text_windows_and_exports_through_gptqmodels_api(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    """gptqmodel needs CUDA: its public API (GPTQModel.load / quantize / save, QuantizeConfig) is replaced by a
    recorder whose save writes the model unchanged, so everything around the library call runs for real."""
    from transformers import AutoModelForCausalLM

    from medicalgpt.export import quantize

    calls = {}

    class QuantizeConfig:
        def __init__(self, bits, group_size):
            calls["config"] = (bits, group_size)

    class GPTQModel:
        @staticmethod
        def load(path, config):
            calls["load"] = path
            return GPTQModel()

        def quantize(self, calibration, batch_size):
            calls["calibration"] = calibration

        def save(self, folder):
            AutoModelForCausalLM.from_pretrained(calls["load"]).save_pretrained(folder)

    library = types.ModuleType("gptqmodel")
    library.__spec__ = importlib.machinery.ModuleSpec("gptqmodel", None)  # found by importlib.util.find_spec
    library.GPTQModel, library.QuantizeConfig = GPTQModel, QuantizeConfig
    monkeypatch.setitem(sys.modules, "gptqmodel", library)
    monkeypatch.setattr(quantize, "cuda_available", lambda: True)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("高血压患者应低盐饮食。\n糖尿病患者应定期检查眼底。\n", encoding="utf-8")
    results = export(capsys, "--model_name_or_path", tiny_model_dir, "--method", "gptq", "--bits", "8",
                     "--group_size", "32", "--calibration_file", str(calibration), "--num_calibration_samples", "3",
                     "--calibration_max_length", "4", "--output_dir", str(tmp_path / "gptq"))  # fmt: skip

    assert calls["config"] == (8, 32) and calls["load"] == tiny_model_dir
    lines = calibration.read_text(encoding="utf-8").splitlines()
    stream = [token for doc in tokenize_documents(tiny_tokenizer, lines, False) for token in doc]
    assert len(stream) > 12  # more than three windows
    assert calls["calibration"] == [{"input_ids": stream[i : i + 4], "attention_mask": [1] * 4} for i in (0, 4, 8)]
    assert results["method"] == "gptq" and results["after"]["memory_bytes"] == results["before"]["memory_bytes"]


def test_help_shows_the_commands_and_every_method(capsys):
    with pytest.raises(SystemExit) as exit_code:
        quantize_model.main(["--help"])
    text = capsys.readouterr().out
    assert exit_code.value.code == 0
    assert "    python quantize_model.py --model_name_or_path merged-sft-qwen-v1 --method nf4 \\" in text.splitlines()
    assert "--method {nf4,int8,gptq}" in text
