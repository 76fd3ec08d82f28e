"""The fused LoRA layer (bench/fused_lora.py) against peft's own: same loss and gradients on the tiny model,
dropout as peft's layer on the masked input, nn.Dropout's mask distribution, identity dropout in eval mode, and
peft's forward where it does not apply. A peft release that changes its LoRA layer's forward or its custom-module
dispatch fails here."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from bench.fused_lora import FusedLoraLinear, use_fused_lora_linear
from medicalgpt.args import LoraArguments
from medicalgpt.model.adapter import build_lora_config


def lora_pair(tiny_model_dir, dropout):
    """peft's LoRA model and the fused one, all linear layers, the same weights (LoRA B random: non-zero grads)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    models = []
    for fused in (False, True):
        config = build_lora_config(LoraArguments(use_peft=True, target_modules="all", lora_dropout=dropout))
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), use_fused_lora_linear(config) if fused else config)
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(std=0.1)
        models.append(model)
    return models


def loss_and_grads(model, batch, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (2, 48), generator=generator)
    labels = ids.clone()
    labels[:, :20] = -100
    return {"input_ids": ids, "labels": labels}


def test_training_step_equals_peft(tiny_model_dir, batch):
    peft_model, fused_model = lora_pair(tiny_model_dir, dropout=0.0)
    fused_layers = [m for m in fused_model.modules() if isinstance(m, FusedLoraLinear)]
    assert len(fused_layers) == 7 * fused_model.config.num_hidden_layers  # q k v o gate up down, every layer
    assert not any(isinstance(m, FusedLoraLinear) for m in peft_model.modules())
    peft_model.train(), fused_model.train()
    loss, grads = loss_and_grads(peft_model, batch)
    fused_loss, fused_grads = loss_and_grads(fused_model, batch)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * len(fused_layers)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_dropout_is_peft_layer_on_the_kept_inputs_scaled_by_one_over_keep():
    """With dropout, the fused layer computes peft's LoRA on the masked input scaled by 1 / (1 - p): the same
    output and gradients as that, recomputed by hand from the same seed's mask."""
    p = 0.25
    config = use_fused_lora_linear(LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"]))
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), config).train()
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 9, 12, requires_grad=True)
    torch.manual_seed(5)
    out = model(x)
    out.square().sum().backward()
    fused_grads = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad]
    x.grad = layer.lora_A["default"].weight.grad = layer.lora_B["default"].weight.grad = None
    torch.manual_seed(5)
    kept = torch.rand_like(x) < 1 - p
    dropped = x * kept / (1 - p)
    lora = layer.lora_B["default"](layer.lora_A["default"](dropped)) * layer.scaling["default"]
    expected = layer.base_layer(x) + lora
    expected.square().sum().backward()
    assert 0 < (~kept).sum() < kept.numel()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-5)


def test_eval_mode_is_without_dropout(tiny_model_dir, batch):
    peft_model, fused_model = lora_pair(tiny_model_dir, dropout=0.5)
    peft_model.eval(), fused_model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        first = fused_model(**batch).loss
        torch.manual_seed(2)
        second = fused_model(**batch).loss
        reference = peft_model(**batch).loss
    assert first == second  # no mask drawn: the seed does not matter
    torch.testing.assert_close(first, reference, rtol=1e-6, atol=1e-6)


def test_mask_keeps_one_minus_p_scaled_by_its_inverse():
    """An identity adapter on a zero base layer returns the dropped input itself: each element 0 with probability p,
    else 1 / (1 - p), independently of its neighbours."""
    p, features = 0.05, 16
    config = use_fused_lora_linear(LoraConfig(r=features, lora_alpha=features, lora_dropout=p, target_modules=["0"]))
    model = get_peft_model(nn.Sequential(nn.Linear(features, features, bias=False)), config).train()
    layer = model.base_model.model[0]
    assert isinstance(layer, FusedLoraLinear)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(features))
        layer.lora_B["default"].weight.copy_(torch.eye(features))
        torch.manual_seed(0)
        out = model(torch.ones(50_000, features))
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    n = out.numel()
    dropped = 1 - kept.float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 standard deviations of the binomial
    # neighbours independent: P(both dropped) is p^2, as for nn.Dropout
    both = (~kept[:, :-1] & ~kept[:, 1:]).float().mean().item()
    assert abs(both - p * p) < 4 * (p * p / n) ** 0.5


def test_falls_back_to_peft_where_fusion_does_not_apply(tiny_model_dir, batch):
    peft_model, fused_model = lora_pair(tiny_model_dir, dropout=0.0)
    peft_model.eval(), fused_model.eval()
    layer = next(m for m in fused_model.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(3, layer.in_features)
    assert layer._fusable_adapter(x) == "default"
    assert layer._fusable_adapter(x.double()) is None  # mixed dtypes: peft's casts
    layer.lora_B["default"].weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks a partitioned parameter
    assert layer._fusable_adapter(x) is None
    del layer.lora_B["default"].weight.ds_id
    with torch.no_grad(), fused_model.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(fused_model(**batch).loss, peft_model(**batch).loss, rtol=0, atol=0)
    fused_model.merge_adapter(), peft_model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(fused_model(**batch).loss, peft_model(**batch).loss, rtol=1e-6, atol=1e-6)
