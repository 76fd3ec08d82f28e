"""Real-world uses of the chunked loss's gradients-in-forward and the fused LoRA layer that held in review, kept
as guards: full training of a tied head over gradient-accumulated micro-batches (one of them without a learned
token) with gradient checkpointing; the fused layer's dropout mask redrawn identically by activation
checkpointing's recomputation (torch restores the generator state, also for int64 `random_`)."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from medicalgpt.args import LoraArguments
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.model.adapter import build_lora_config
from medicalgpt.model.fused_lora import FusedLoraLinear, use_fused_lora_linear
from medicalgpt.train.chunked_loss import add_chunked_lm_head


def micro_batches(vocab_size):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(3):
        ids = torch.randint(3, vocab_size, (2, 30), generator=generator)
        labels = ids.clone()
        labels[:, :10] = IGNORE_INDEX
        if index == 1:
            labels[:] = IGNORE_INDEX  # a micro-batch of prompts only
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def accumulated_grads(model_dir, chunked):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny Qwen ties them, as SmolLM2 does
    if chunked:
        add_chunked_lm_head(model, chunk_size=7)
    model.gradient_checkpointing_enable()
    model.train()
    batches = micro_batches(model.config.vocab_size)
    total = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))  # Trainer's count
    for inputs in batches:
        extra = {"chunked_loss": True} if chunked else {}
        model(**inputs, num_items_in_batch=total, **extra).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_tied_head_full_training_accumulates_the_plain_gradients(tiny_model_dir):
    plain, chunked = accumulated_grads(tiny_model_dir, False), accumulated_grads(tiny_model_dir, True)
    assert plain.keys() == chunked.keys() and "model.embed_tokens.weight" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_dropout_mask(tiny_model_dir, reentrant):
    """A recomputation that drew a new mask would give gradients of another function than the loss's."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = micro_batches(base.config.vocab_size)[0]
    results = []
    for checkpointing in (False, True):
        config = build_lora_config(LoraArguments(use_peft=True, target_modules="all", lora_dropout=0.3))
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), use_fused_lora_linear(config))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        assert any(isinstance(m, FusedLoraLinear) for m in model.modules())
        torch.manual_seed(7)
        model(**inputs).loss.backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
