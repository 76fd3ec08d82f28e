"""A benchmark's dev items as SFT data: accuracy on them goes from about chance to right, seen by log-likelihood in
one --compare table (base against fine-tuned), by generated replies, and by replies over the OpenAI-compatible API
of the project's own server."""

import json

import pytest

import evaluate
import supervised_finetuning
from medicalgpt.eval.benchmarks import load_benchmark
from medicalgpt.eval.compare import model_specs
from medicalgpt.eval.items import choice_sft_records
from medicalgpt.serve.chat import ChatArguments
from tests.helpers import FAST_FLAGS, REPO, serving, write_jsonl

CEVAL = str(REPO / "data" / "eval" / "ceval")
DEV = ["--data_file", CEVAL, "--split", "dev", "--template_name", "qwen"]


@pytest.fixture(scope="module")
def fine_tuned(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned (in-process SFT) on C-Eval's dev items as choice_sft_records writes them."""
    root = tmp_path_factory.mktemp("ceval-sft")
    items, _ = load_benchmark(CEVAL, split="dev")
    records = choice_sft_records(items)
    assert records[0]["messages"][1] == {"role": "assistant", "content": items[0]["answer"]}
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(write_jsonl(root / "sft.jsonl", records))]
    argv += ["--do_train", "--template_name", "qwen", "--output_dir", str(root / "sft"), "--num_train_epochs", "50"]
    argv += ["--learning_rate", "3e-3", "--per_device_train_batch_size", "4", "--save_strategy", "no"]
    supervised_finetuning.main([*argv, *FAST_FLAGS])
    return {"model": str(root / "sft"), "root": root, "items": items}


def test_dev_accuracy_goes_from_chance_to_right_in_one_comparison(fine_tuned, tiny_model_dir):
    out = fine_tuned["root"] / "compare"
    argv = ["--task", "choice", *DEV, "--output_dir", str(out)]
    results = evaluate.main([*argv, "--compare", f"base={tiny_model_dir}", f"sft={fine_tuned['model']}"])
    base, sft = results["base"], results["sft"]
    print(f"C-Eval dev accuracy: base {base['accuracy']:.2f}, after SFT {sft['accuracy']:.2f}")
    assert base["accuracy"] <= 0.5 and sft["accuracy"] >= 0.9 and base["chance"] == sft["chance"] == 0.25
    assert set(sft["subjects"]) == {"basic_medicine", "clinical_medicine", "law"} and sft["items"] == 7
    table = (out / "compare.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| subject | items | base | sft |"
    cell = lambda m: "{:.3f} [{:.3f}, {:.3f}]".format(m["accuracy"], *m["ci95"])  # noqa: E731
    assert table[-4] == f"| **overall** | 7 | {cell(base)} | {cell(sft)} |"
    assert table[-3] == "| chance | 7 | 0.250 | 0.250 |" and table[-1] == "Accuracy [95% Wilson interval]."
    assert any(line.startswith("| clinical_medicine | 3 |") for line in table)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["models"]["sft"]["accuracy"] == sft["accuracy"] and saved["split"] == "dev"
    rows = [json.loads(line) for line in (out / "sft" / "choice_predictions.jsonl").open()]
    assert len(rows) == 7 and sum(row["correct"] for row in rows) == sft["correct"]


def test_generated_letters_are_right_after_fine_tuning_locally_and_over_the_api(fine_tuned, tmp_path):
    from medicalgpt.serve.chat import GenerationOptions, load_chat_engine
    from medicalgpt.serve.server import build_app

    flags = ["--task", "choice", *DEV, "--choice_mode", "generate", "--max_new_tokens", "4"]
    local = evaluate.main([*flags, "--base_model", fine_tuned["model"], "--output_dir", str(tmp_path / "local")])
    assert local["accuracy"] >= 0.9 and local["unparsed"] == 0
    engine = load_chat_engine(ChatArguments(base_model=fine_tuned["model"], template_name="qwen"))
    app = build_app(engine, "ceval-sft", api_key="k", defaults=GenerationOptions(temperature=0, max_new_tokens=4))
    with serving(app) as url:
        api = evaluate.main([*flags, "--api_base", f"{url}/v1", "--api_key", "k", "--model", "ceval-sft",
                             "--output_dir", str(tmp_path / "api")])  # fmt: skip
    replies = [[json.loads(line)["reply"] for line in (tmp_path / name / "choice_predictions.jsonl").open()]
               for name in ("local", "api")]  # fmt: skip
    assert replies[0] == replies[1] and api["accuracy"] == local["accuracy"]


def test_compare_resolves_adapters_on_their_base(sft_adapter_dir, tiny_model_dir, tmp_path):
    from medicalgpt.errors import UsageError

    chat = ChatArguments(base_model=None, template_name="qwen")
    (name, lora), (_, merged) = model_specs([f"lora={sft_adapter_dir}", f"merged={tiny_model_dir}"], chat)
    assert name == "lora" and lora.lora_model == sft_adapter_dir and lora.base_model == tiny_model_dir
    assert merged.base_model == tiny_model_dir and merged.lora_model is None
    with pytest.raises(UsageError, match="no such model folder"):
        model_specs([f"x={tmp_path / 'missing'}"], chat)
    with pytest.raises(UsageError, match="distinct NAME"):
        model_specs([f"a={tiny_model_dir}", f"a={tiny_model_dir}"], chat)
