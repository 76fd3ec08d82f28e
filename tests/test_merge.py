"""merge_peft_adapter.py: causal-LM and reward-model adapters, resized embeddings, tokenizer and stop tokens."""

import json
import os
import subprocess
import sys

import pytest
import torch

import merge_peft_adapter
from medicalgpt.templates import conv_templates
from tests.helpers import QA_PAIRS, REPO, qa_adapter

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 1200]])


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, tiny_model_dir):
    return qa_adapter(tmp_path_factory, tiny_model_dir)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_tutorial_merge_command_matches_the_adapter_logits_and_stops_at_end_of_turn(tiny_model_dir, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged-sft-qwen-v1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "merge_peft_adapter.py", "--base_model_name_or_path", tiny_model_dir,
         "--peft_model_path", adapter, "--output_dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "merged-sft-qwen-v1.partial").exists()
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    torch.testing.assert_close(logits(merged), logits(with_adapter), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), atol=1e-3)

    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in merged.generation_config.eos_token_id
    question, answer = QA_PAIRS[1]
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = merged.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    assert generated[-1] == im_end and tokenizer.decode(generated[:-1]) == answer  # stops with generate's defaults


def test_an_existing_output_dir_is_not_overwritten_without_the_flag(tiny_model_dir, adapter, tmp_path):
    from medicalgpt.errors import UsageError

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--base_model", tiny_model_dir, "--lora_model", adapter, "--output_dir", str(out)]
    with pytest.raises(UsageError, match="not empty"):
        merge_peft_adapter.main(argv)
    assert (out / "keep.txt").exists()
    merge_peft_adapter.main([*argv, "--overwrite_output_dir", "True"])
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_reward_model_adapter_merges_into_a_sequence_classifier(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    rm_adapter = tmp_path / "outputs-rm-qwen-v1"
    get_peft_model(model, config).save_pretrained(rm_adapter)  # the score head is saved with the adapter

    out = tmp_path / "merged-rm"
    merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", str(rm_adapter),
                             "--tokenizer_path", tiny_model_dir, "--output_dir", str(out)])  # fmt: skip
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id is not None
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reference = PeftModel.from_pretrained(base, rm_adapter)
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-5, atol=1e-5)
    assert logits(merged).shape == (1, 1)


@pytest.mark.parametrize("embeddings_in_adapter", [True, False])
def test_extended_vocabulary_adapter_merges_with_grown_embeddings(tiny_model_dir, tmp_path, embeddings_in_adapter,
                                                                  caplog):  # fmt: skip
    """After build_domain_tokenizer.py, training grows the embeddings (medicalgpt.model.embeddings); the merge grows
    them the same way, so the new tokens' rows match whether the adapter saved them (modules_to_save) or not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medicalgpt.data.vocab import INIT_FILE
    from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer

    extended = tmp_path / "outputs-pt-extended"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    parts = [tokenizer.encode(term, add_special_tokens=False) for term in ("肺结节", "甲状腺结节")]
    tokenizer.add_tokens(["肺结节", "甲状腺结节"])
    tokenizer.save_pretrained(extended)
    tokens = [{"id": len(tokenizer) - 2 + i, "base_ids": ids} for i, ids in enumerate(parts)]
    (extended / INIT_FILE).write_text(json.dumps({"tokens": tokens, "base_vocab_size": len(tokenizer) - 2}))
    tokenizer = AutoTokenizer.from_pretrained(extended)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert resize_embeddings_for_tokenizer(base, tokenizer) == 2  # what pretraining.py does after loading
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM",
                        modules_to_save=["embed_tokens"] if embeddings_in_adapter else None)  # fmt: skip
    peft_model = get_peft_model(base, config)
    if embeddings_in_adapter:
        with torch.no_grad():
            peft_model.base_model.model.model.embed_tokens.modules_to_save["default"].weight[-2:] = torch.randn(2, 64)
    peft_model.save_pretrained(extended)
    ids = torch.tensor([[5, 17, len(tokenizer) - 1, len(tokenizer) - 2, 7]])
    expected = logits(peft_model, ids)

    out = tmp_path / "merged-pt"
    merge_peft_adapter.main(["--base_model_name_or_path", tiny_model_dir, "--peft_model_path", str(extended),
                             "--output_dir", str(out), "--resize_emb", "True"])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    replaced = "and then replaced: " in caplog.text  # the rows' initialisation is not what the merge keeps
    assert replaced == embeddings_in_adapter


def test_template_name_gives_a_tokenizer_without_one_a_chat_template_and_stop_token(tiny_model_dir, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain_tokenizer = tmp_path / "tokenizer-without-template"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain_tokenizer)
    assert not AutoTokenizer.from_pretrained(plain_tokenizer).chat_template
    out = tmp_path / "merged"
    merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", adapter, "--tokenizer_path",
                             str(plain_tokenizer), "--template_name", "vicuna", "--output_dir", str(out)])  # fmt: skip
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    rendered = merged_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == conv_templates["vicuna"].render(messages)
    config = json.loads((out / "generation_config.json").read_text())
    assert merged_tokenizer.eos_token_id in config["eos_token_id"]
    AutoModelForCausalLM.from_pretrained(out)


CONVERSATIONS = [
    [{"role": "user", "content": " 发烧怎么办？ "}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": " a1"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
]


@pytest.mark.parametrize("name", sorted(n for n, t in conv_templates.items() if t.thinking is None))
def test_jinja_form_of_each_template_renders_like_the_template(tiny_tokenizer, name):
    template = conv_templates[name]
    jinja = merge_peft_adapter.chat_template_for(template)
    for system in (None, "", "你是一名医生。"):
        for conversation in CONVERSATIONS:
            head = [] if system is None else [{"role": "system", "content": system}]
            rendered = tiny_tokenizer.apply_chat_template(head + conversation, chat_template=jinja, tokenize=False)
            assert rendered == template.render(conversation, system_prompt=system)


def test_not_an_adapter_is_a_clear_error(tiny_model_dir, tmp_path):
    from medicalgpt.errors import UsageError

    with pytest.raises(UsageError, match="LoRA adapter directory"):
        merge_peft_adapter.main(["--peft_model_path", tiny_model_dir, "--output_dir", str(tmp_path / "out")])
