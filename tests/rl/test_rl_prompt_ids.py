"""GRPO / RLOO prompts reach the policy as the template's token ids: with a tokenizer that adds a BOS itself (Llama-3,
Mistral, Llama-2) the prompt has one BOS, as in SFT and inference, not two."""

import pytest
import torch
import transformers
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppo_training
from medicalgpt.rl.exam import load_exam_records
from medicalgpt.rl.prompts import prepare_rl_prompts
from medicalgpt.templates import build_template, retokenizable_texts
from tests.helpers import FAST_FLAGS, REPO

LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that adds <|begin_of_text|> to every text it encodes, as Llama-3's does."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIALS})
    bos = ("<|begin_of_text|>", tokenizer.bos_token_id)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[bos]
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    out = tmp_path_factory.mktemp("bos-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_prompt_texts_encode_back_to_the_template_ids_with_one_bos(bos_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_model_dir)
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos, "the fixture's tokenizer adds a BOS"
    records = load_exam_records(str(REPO / "data" / "grpo" / "validation.jsonl"))
    prompts = prepare_rl_prompts(records, build_template("llama3", tokenizer), tokenizer, 1024)
    texts, differ = retokenizable_texts(tokenizer, prompts)
    assert differ == 0 and tokenizer(texts)["input_ids"] == prompts
    assert all(ids[0] == bos and ids[1] != bos for ids in prompts)
    assert texts[0].startswith("<|start_header_id|>user<|end_header_id|>")


def test_grpo_policy_generates_from_the_template_prompt_ids(bos_model_dir, tmp_path, monkeypatch):
    """Every prompt trl's GRPOTrainer hands to the policy's generate() is one of prepare_rl_prompts' id lists."""
    seen = []
    generate = transformers.GenerationMixin.generate

    def recording_generate(self, input_ids=None, attention_mask=None, **kwargs):
        seen.extend(tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask))
        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", recording_generate)
    exam = str(REPO / "data" / "grpo" / "validation.jsonl")
    ppo_training.main(
        [
            "--rl_algorithm",
            "grpo",
            "--reward_funcs",
            "choice_accuracy",
            "--sft_model_path",
            bos_model_dir,
            "--template_name",
            "llama3",
            "--train_file_dir",
            exam,
            "--do_train",
            "--output_dir",
            str(tmp_path / "grpo"),
            "--response_length",
            "2",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            *FAST_FLAGS,
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(bos_model_dir)
    expected = prepare_rl_prompts(load_exam_records(exam), build_template("llama3", tokenizer), tokenizer, 1024)
    assert seen and set(seen) == {tuple(ids) for ids in expected}
    assert torch.tensor([ids[:2] for ids in seen])[:, 1].ne(tokenizer.bos_token_id).all()
