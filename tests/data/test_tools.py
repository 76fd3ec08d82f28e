"""Data tools: convert_dataset.py, validate_jsonl.py's token statistics, build_domain_tokenizer.py and the embedding
resize, down to an extended vocabulary -> PT -> merge run on the tiny model."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import build_domain_tokenizer
import convert_dataset
import validate_jsonl
from medicalgpt.data.validate import validate_file
from medicalgpt.data.vocab import INIT_FILE
from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer
from tests.helpers import FAST_FLAGS, REPO, write_jsonl

FINETUNE = REPO / "data" / "finetune"
VOCAB = REPO / "data" / "vocab" / "medical_vocab.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ALPACA = [
    {"instruction": "孩子发烧怎么办？", "input": "38.5度", "output": "多喝水，观察精神状态。",
     "system": "你是儿科医生", "history": [["你好", "你好！有什么可以帮您？"], ["孩子三岁", "请说说症状。"]]},
    {"instruction": "高血压要长期吃药吗？", "input": "", "output": "多数需要长期规律服药。"},
]  # fmt: skip


def convert(source, target, *flags):
    return convert_dataset.main(["--input_file", str(source), "--output_file", str(target), *flags])


def normalised(path):
    """The validator's records of a file, without `source`, tool-call JSON compared parsed."""
    report = validate_file(str(path), "sft")
    assert report.errors == []
    for record in report.records:
        del record["source"]
        for message in record["messages"]:
            if message["role"] == "function_call":
                message["content"] = json.loads(message["content"])
    return report.records


def test_tutorial_convert_command_keeps_alpaca_system_and_history(tmp_path):
    (tmp_path / "your_data.json").write_text(json.dumps(ALPACA, ensure_ascii=False, indent=2), encoding="utf-8")
    command = [sys.executable, str(REPO / "convert_dataset.py"), "--input_file", "your_data.json"]
    command += ["--output_file", "converted_data.jsonl", "--template_name", "qwen"]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Converted 2 records (alpaca 2) from your_data.json to converted_data.jsonl (sharegpt" in result.stdout
    lines = (tmp_path / "converted_data.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])["conversations"]
    assert [turn["from"] for turn in first] == ["system", "human", "gpt", "human", "gpt", "human", "gpt"]
    assert first[0]["value"] == "你是儿科医生" and first[5]["value"] == "孩子发烧怎么办？\n38.5度"
    assert len(lines) == 2
    assert normalised(tmp_path / "converted_data.jsonl") == normalised(tmp_path / "your_data.json")


@pytest.mark.parametrize("output_format", ["sharegpt", "messages", "alpaca"])
def test_every_sample_file_converts_both_ways_record_for_record(output_format, tmp_path):
    for source in sorted(FINETUNE.glob("*.jsonl")):
        if output_format == "alpaca" and "tool" in source.name:
            continue
        there, back = tmp_path / f"{source.stem}.{output_format}.json", tmp_path / f"{source.stem}.back.jsonl"
        assert convert(source, there, "--output_format", output_format) == 0
        keys = {"sharegpt": {"conversations"}, "messages": {"messages"}, "alpaca": {"instruction", "output"}}
        assert json.loads(there.read_text(encoding="utf-8"))[0].keys() >= keys[output_format]  # one JSON array
        assert (
            convert_dataset.main(["--in_file", str(there), "--out_file", str(back), "--data_type", output_format]) == 0
        )
        assert normalised(there) == normalised(source) == normalised(back), source.name


def test_tool_calls_become_openai_tool_calls_and_alpaca_refuses_them(tmp_path, capsys):
    source = FINETUNE / "tool_calling_zh.jsonl"
    out = tmp_path / "messages.jsonl"
    assert convert(source, out, "--output_format", "messages") == 0
    record = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    call = record["messages"][1]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "lookup_drug_interaction"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"drugs": ["华法林", "布洛芬"]}
    assert record["messages"][2]["role"] == "tool" and json.loads(record["tools"])
    capsys.readouterr()
    alpaca = tmp_path / "alpaca.jsonl"
    assert convert(source, alpaca, "--output_format", "alpaca") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{source}:1: error: alpaca has no place for tool calls or tool results: use --output_format " \
                     "sharegpt or messages"  # fmt: skip
    assert not alpaca.exists()


def test_csv_and_tsv_question_answer_columns(tmp_path, capsys):
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text('question,answer\n头痛怎么办,"注意休息,\n必要时就医"\n"发烧，怎么办",多喝水\n', "utf-8")
    out = tmp_path / "qa.jsonl"
    assert convert(csv_file, out, "--data_type", "qa") == 0
    assert [r["messages"] for r in normalised(out)] == [
        [{"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "注意休息,\n必要时就医"}],
        [{"role": "user", "content": "发烧，怎么办"}, {"role": "assistant", "content": "多喝水"}],
    ]
    tsv_file = tmp_path / "upstream_qa.csv"  # upstream's "csv": tab-separated, no header
    tsv_file.write_text("问题一\t回答一\n问题二\t回答二\t多余\n\n问题三\t\n", encoding="utf-8")
    capsys.readouterr()
    argv = ["--in_file", str(tsv_file), "--out_file", str(tmp_path / "t.jsonl"), "--data_type", "qa"]
    assert convert_dataset.main([*argv, "--file_type", "csv"]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{tsv_file}:2: error: expected 2 columns, got 3; or give the file a header row",
        f"{tsv_file}:4: error: output: no assistant content to learn from",
    ]
    assert not (tmp_path / "t.jsonl").exists()


def test_bad_input_is_reported_by_line_and_nothing_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{oops}\n'
                   '{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
                   encoding="utf-8")  # fmt: skip
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n", encoding="utf-8")
    assert convert(bad, out) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{bad}:2: error: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert printed[1].startswith(f"{bad}:3: error: conversations[1].from: unknown role 'bot'")
    assert out.read_text(encoding="utf-8") == "previous output\n"
    assert convert(bad, out, "--data_type", "messages") == 1
    printed = capsys.readouterr().out
    assert f"{bad}:1: error: not a messages record: no 'messages' (got keys: instruction, output)" in printed
    assert convert(bad, out, "--skip_invalid_examples") == 0
    assert "Converted 2 records (alpaca 1, messages 1, skipped 2 invalid)" in capsys.readouterr().out
    assert len(normalised(out)) == 2 and sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out.jsonl"]


def test_json_array_to_jsonl_keeps_records_as_they_are(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "data.jsonl"
    assert convert(array, out, "--data_type", "json2jsonl") == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == ALPACA


def sft_lengths(tokenizer, messages, system=None):
    """Token counts of each (prompt, response) of a conversation under the qwen template, from the template alone."""
    from medicalgpt.templates import get_conv_template

    turns = get_conv_template("qwen").render_turns(messages, system)
    return [(len(tokenizer.encode(p, add_special_tokens=False)), len(tokenizer.encode(r, add_special_tokens=False)))
            for p, r in turns]  # fmt: skip


def test_validate_jsonl_token_statistics_plot_and_masks(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    long_answer = "高血压患者应定期测量血压，按时服药。" * 20
    two_turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                 {"role": "user", "content": "头痛？"}, {"role": "assistant", "content": long_answer}]  # fmt: skip
    first_too_long = [{"role": "user", "content": "血压"}, {"role": "assistant", "content": long_answer * 2}]
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": two_turns}, {"messages": first_too_long}])
    (a_prompt, a_answer), (b_prompt, b_answer) = sft_lengths(tiny_tokenizer, two_turns)
    ((c_prompt, c_answer),) = sft_lengths(tiny_tokenizer, first_too_long)
    limit = a_prompt + a_answer + 5
    assert limit < c_prompt + c_answer
    plot = tmp_path / "plots" / "lengths.png"
    argv = [str(data), "--tokenizer", tiny_model_dir, "--template_name", "qwen", "--model_max_length", str(limit)]
    assert validate_jsonl.main([*argv, "--plot", str(plot), "--show", "1"]) == 0
    out = capsys.readouterr().out
    lengths = sorted([a_prompt + a_answer + b_prompt + b_answer, c_prompt + c_answer])
    assert f"sft token lengths over 2 records: min {lengths[0]}, median {lengths[1]}" in out
    # the long first answer is cut at the limit after at most half of it for the prompt (--overlong truncate)
    c_kept = limit - min(c_prompt, limit // 2)
    assert (f"sft at model_max_length {limit}: 2 of 2 records would be truncated (1 turns dropped from their ends, "
            f"1 first exchanges cut, 0 records skipped whole); {b_answer + c_answer - c_kept} of "
            f"{a_answer + b_answer + c_answer} supervised tokens lost") in out  # fmt: skip
    # the end-of-turn token is learned; --show applies the truncation: the dropped turn is not shown
    assert out.endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n[LEARN]你好！<|im_end|>[/LEARN]\n")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(plot.parent) == ["lengths.png"]
    assert validate_jsonl.main([str(data), "--tokenizer", tiny_model_dir, "--template_name", "vicuna"]) == 0
    assert "warning: template 'vicuna' ends assistant turns with '</s>', which this tokenizer splits into" in (
        capsys.readouterr().out
    )


def test_validate_jsonl_preference_lengths_and_flag_checks(tiny_model_dir, tmp_path, capsys):
    pair = {"prompt": "头痛怎么办？", "chosen": "注意休息。" * 30, "rejected": "不用管。"}
    data = write_jsonl(tmp_path / "pref.jsonl", [pair])
    argv = [str(data), "--tokenizer", tiny_model_dir, "--template_name", "qwen", "--max_target_length", "8"]
    assert validate_jsonl.main(argv) == 0
    out = capsys.readouterr().out
    assert "preference at max_source_length 1024 / max_target_length 8: 1 of 1 records would be truncated" in out
    with pytest.raises(SystemExit):
        validate_jsonl.main([str(data), "--show", "2"])  # --show needs --tokenizer


UPSTREAM = REPO.parent / "shared" / "data" / "upstream"


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="upstream MedicalGPT data not on this machine")
def test_upstream_files_validate_and_tool_calls_tokenise(tiny_model_dir, capsys):
    sft, reward = UPSTREAM / "sft", UPSTREAM / "reward"
    assert validate_jsonl.main([str(sft), str(reward), "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{sft}/sharegpt_zh_1K_format.jsonl:781: error: conversations: no assistant content to learn from",
        "total: 5 files, 2810 records, 13654 turns, 1 errors, 25 warnings",
    ]  # the one record with nothing to learn: a lone user turn
    tool_files = [str(sft / "glaive_toolcall_zh_demo.jsonl"), str(reward / "toolcall_dpo_zh_demo.jsonl")]
    assert (
        validate_jsonl.main([*tool_files, "--tokenizer", tiny_model_dir, "--template_name", "qwen", "--show", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "sft token lengths over 300 records" in out and "preference token lengths over 11 records" in out
    assert '<|im_start|>assistant\n[LEARN]<tool_call>\n{"name": "generate_invoice"' in out


def build_tokenizer_argv(model_dir, output_dir, domain=VOCAB, *extra):
    """The tutorial's vocabulary command, the base tokenizer pointed at the tiny model."""
    return ["--base_tokenizer_path", model_dir, "--domain_file_path", str(domain), "--output_dir", str(output_dir),
            *extra]  # fmt: skip


def test_tutorial_vocabulary_command_makes_each_term_one_token(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    corpus = str(REPO / "data" / "pretrain" / "medical_articles.txt")
    out = tmp_path / "tokenizer-extended"
    assert build_domain_tokenizer.main(build_tokenizer_argv(tiny_model_dir, out, VOCAB, "--eval_file", corpus)) == 0
    printed = capsys.readouterr().out
    extended = AutoTokenizer.from_pretrained(out)
    terms = [line.strip() for line in VOCAB.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(len(extended.encode(term, add_special_tokens=False)) == 1 for term in terms)
    added = len(extended) - len(tiny_tokenizer)
    already = sum(len(tiny_tokenizer.encode(term, add_special_tokens=False)) == 1 for term in terms)
    assert added == len(set(terms)) - already > 100
    assert f"{already} already one token; added {added} tokens: {len(tiny_tokenizer)} -> {len(extended)}" in printed
    figures = re.search(r"tokens per character on 135 texts .*: ([\d.]+) -> ([\d.]+)", printed).groups()
    before, after = map(float, figures)
    assert after < before
    texts = (REPO / "data" / "pretrain" / "medical_articles.txt").read_text(encoding="utf-8").splitlines()
    assert all(extended.decode(extended.encode(text, add_special_tokens=False)) == text for text in texts)
    plain = "Drink water and rest."  # no term: same ids as before
    assert extended.encode(plain) == tiny_tokenizer.encode(plain)
    sources = json.loads((out / INIT_FILE).read_text(encoding="utf-8"))
    entry = sources["tokens"][0]
    assert entry["id"] == len(tiny_tokenizer) and entry["base_ids"] == tiny_tokenizer.encode(entry["token"])


def test_vocabulary_file_forms_and_terms_left_out(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    vocab = tmp_path / "terms.vocab.txt"  # a SentencePiece .vocab file: piece<TAB>score
    vocab.write_text("<unk>\t0\n\u2581冠心病\t-1\n心肌梗死\t-2\n心肌梗死\n\nés\t-3\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert build_domain_tokenizer.main(build_tokenizer_argv(tiny_model_dir, out, vocab)) == 0
    printed = capsys.readouterr().out
    assert "vocab, 3 terms; 0 already one token; added 2 tokens" in printed
    assert "left out 1 terms that would not decode back as added tokens: ['és']" in printed  # byte-level decoder
    added = json.loads((out / INIT_FILE).read_text(encoding="utf-8"))["tokens"]
    assert [token["token"] for token in added] == ["冠心病", "心肌梗死"]


def test_corpus_mode_learns_frequent_terms_within_the_budget(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    lines = [f"第{i}位患者做了幽门螺杆菌呼气试验，结果提示萎缩性胃炎，需要复查胃镜。" for i in range(30)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "learned"
    assert build_domain_tokenizer.main(build_tokenizer_argv(tiny_model_dir, out, corpus, "--vocab_size", "5")) == 0
    assert "corpus" in capsys.readouterr().out
    added = json.loads((out / INIT_FILE).read_text(encoding="utf-8"))["tokens"]
    assert 0 < len(added) <= 5
    assert all(len(tiny_tokenizer.encode(token["token"])) > 1 for token in added)
    assert any(token["token"] in "幽门螺杆菌呼气试验萎缩性胃炎" for token in added)


def extended_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    build_domain_tokenizer.main(build_tokenizer_argv(tiny_model_dir, tmp_path / "tok"))
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_resize_initialises_new_rows_from_their_sub_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = extended_tokenizer(tiny_model_dir, tmp_path)
    sources = json.loads((tmp_path / "tok" / INIT_FILE).read_text(encoding="utf-8"))["tokens"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False  # an untied head gets its own means
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    before = model.get_input_embeddings().weight.detach().clone()
    assert resize_embeddings_for_tokenizer(model, tokenizer) == len(sources)
    rows, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert rows.shape[0] == head.shape[0] == len(tokenizer)
    assert torch.equal(rows[: before.shape[0]], before)
    for entry in sources[:20]:
        assert torch.allclose(rows[entry["id"]], before[entry["base_ids"]].mean(0), atol=1e-6)
        assert torch.allclose(head[entry["id"]], 2 * before[entry["base_ids"]].mean(0), atol=1e-6)
    with torch.no_grad():
        rows[sources[0]["id"]] += 1.0  # "trained"
    trained = rows.detach().clone()
    assert resize_embeddings_for_tokenizer(model, tokenizer) == 0  # the same tokenizer again resets nothing
    assert torch.equal(model.get_input_embeddings().weight, trained)


def test_new_tokens_in_untrained_padding_rows_are_initialised(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = extended_tokenizer(tiny_model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)  # padded like Qwen2.5: 151,936 rows
    with torch.no_grad():
        model.get_input_embeddings().weight[base.shape[0] :] = 0
    entry = json.loads((tmp_path / "tok" / INIT_FILE).read_text(encoding="utf-8"))["tokens"][-1]
    assert resize_embeddings_for_tokenizer(model, tokenizer) == len(tokenizer) - base.shape[0]
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(tokenizer) + 64 and model.lm_head.weight is rows
    assert torch.allclose(rows[entry["id"]], base[entry["base_ids"]].mean(0), atol=1e-6)
    assert rows[len(tokenizer) :].abs().sum() == 0  # padding beyond the tokenizer stays as it was


def test_extended_vocabulary_pretraining_then_merge_generates(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import merge_peft_adapter
    import pretraining

    tokenizer = extended_tokenizer(tiny_model_dir, tmp_path)
    sources = {e["token"]: e for e in json.loads((tmp_path / "tok" / INIT_FILE).read_text(encoding="utf-8"))["tokens"]}
    seen, unseen = "心肌梗死", "冠心病"
    assert seen in sources and unseen in sources
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "notes.txt").write_text("\n".join([f"{seen}患者需要尽快就医，{seen}是急症。"] * 16), "utf-8")
    out, merged = tmp_path / "outputs-pt", tmp_path / "merged-pt"
    argv = ["--model_name_or_path", tiny_model_dir, "--tokenizer_name_or_path", str(tmp_path / "tok"), "--do_train"]
    argv += ["--train_file_dir", str(tmp_path / "pt"), "--use_peft", "True", "--target_modules", "all"]
    argv += ["--modules_to_save", "embed_tokens,lm_head", "--block_size", "64", "--per_device_train_batch_size", "4"]
    argv += ["--max_steps", "2", "--learning_rate", "1e-2", "--save_strategy", "no", "--output_dir", str(out)]
    pretraining.main([*argv, *FAST_FLAGS])
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys() if "modules_to_save" in key}
    assert shapes and all(shape[0] == len(tokenizer) for shape in shapes.values()), shapes
    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_model

    in_memory = load_model(ModelArguments(model_name_or_path=str(out)))  # SFT on the PT adapter folder loads it so
    assert in_memory.get_input_embeddings().weight.shape[0] == len(tokenizer)
    merge_peft_adapter.main(["--base_model_name_or_path", tiny_model_dir, "--peft_model_path", str(out),
                             "--resize_emb", "--output_dir", str(merged)])  # fmt: skip

    model, merged_tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    assert len(merged_tokenizer) == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    ids = merged_tokenizer(f"{seen}和{unseen}", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [sources[seen]["id"], *merged_tokenizer.encode("和"), sources[unseen]["id"]]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    rows = model.get_input_embeddings().weight
    # Tied embeddings stay tied: one matrix, as Qwen ships it, trained through both its input and output use.
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight is rows
    assert not torch.allclose(rows[sources[seen]["id"]], base[sources[seen]["base_ids"]].mean(0), atol=1e-4)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(reference, out).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=merged_tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4) or merged_tokenizer.eos_token_id in generated[0].tolist()
