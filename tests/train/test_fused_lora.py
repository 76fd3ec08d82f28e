"""The fused LoRA layer (medicalgpt/model/fused_lora.py) against peft's own: same loss and gradients on the tiny
model, dropout as peft's layer on the masked input, the mask's distribution, identity dropout in eval mode, peft's
forward where it does not apply, and training's use of it (new and continued adapters, not 4/8-bit models; the
saved adapter is peft's). A peft release that changes its LoRA layer's forward or its custom-module dispatch fails
here."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from medicalgpt.args import LoraArguments
from medicalgpt.model.adapter import build_lora_config
from medicalgpt.model.fused_lora import MASK_LEVELS, FusedLoraLinear, keep_mask, use_fused_lora_linear


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
    """With dropout, the fused layer computes peft's LoRA on the masked input scaled by 1 / keep, keep being 1 - p
    rounded to a multiple of 2**-15: the same output and gradients as that, recomputed by hand from the same seed's
    mask."""
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
    keep_levels = 24576  # 0.75 * 2**15, exact
    kept = keep_mask(x, keep_levels)
    dropped = x * kept / (keep_levels / MASK_LEVELS)
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


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_mask_keeps_one_minus_p_scaled_by_its_inverse(p):
    """An identity adapter on a zero base layer returns the dropped input itself: each element 0 with probability
    p (to 2**-16), else 1 / keep, keep the exact probability of keeping it, so the expectation is the input;
    independently of its neighbours, also of the three that share its 64-bit draw."""
    features = 16
    config = use_fused_lora_linear(LoraConfig(r=features, lora_alpha=features, lora_dropout=p, target_modules=["0"]))
    model = get_peft_model(nn.Sequential(nn.Linear(features, features, bias=False)), config).train()
    layer = model.base_model.model[0]
    assert isinstance(layer, FusedLoraLinear)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(features))
        layer.lora_B["default"].weight.copy_(torch.eye(features))
        torch.manual_seed(0)
        out = model(torch.ones(100_000, features))
    keep = round((1 - p) * 2**15) / 2**15
    assert abs(keep - (1 - p)) <= 2**-16
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / keep))
    n = out.numel()
    dropped = 1 - kept.float().mean().item()
    assert abs(dropped - (1 - keep)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 standard deviations of the binomial
    assert abs(out.mean().item() - 1) < 4 * ((1 - keep) / keep / n) ** 0.5  # unbiased: E[dropped input] = input
    # neighbours independent: P(both dropped) is p^2, as for nn.Dropout, at every distance within a 64-bit draw
    flat = ~kept.flatten()
    for distance in (1, 2, 3, 4):
        both = (flat[:-distance] & flat[distance:]).float().mean().item()
        assert abs(both - p * p) < 4 * (p * p / n) ** 0.5, distance


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


def wrapped(model_dir, tmp_path, **lora_flags):
    from transformers import TrainingArguments

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.adapter import wrap_with_lora
    from medicalgpt.model.loader import load_model

    model_args = ModelArguments(model_name_or_path=model_dir, **lora_flags.pop("model_flags", {}))
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    lora_args = LoraArguments(use_peft=True, target_modules="all", **lora_flags)
    return wrap_with_lora(load_model(model_args), lora_args, training_args, base_path=model_dir)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [type(m) for m in model.modules() if isinstance(m, LoraLayer)]


def test_training_uses_the_fused_layer_and_saves_peft_adapters(tiny_model_dir, tmp_path, batch):
    """Every LoRA script's wrap_with_lora: a new adapter and one continued from --peft_path train with the fused
    layer; the saved adapter is plain peft's (no custom module in its config) and gives the same outputs there."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = wrapped(tiny_model_dir, tmp_path, lora_dropout=0.05)
    assert set(lora_layers(model)) == {FusedLoraLinear} and len(lora_layers(model)) == 14
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.05 and not any("custom" in key for key in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert FusedLoraLinear not in lora_layers(plain)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).loss, plain(**batch).loss, rtol=1e-6, atol=1e-6)
    continued = wrapped(tiny_model_dir, tmp_path, peft_path=str(tmp_path / "adapter"))
    assert set(lora_layers(continued)) == {FusedLoraLinear}
    assert any(p.requires_grad for n, p in continued.named_parameters() if "lora_B" in n)


def test_4bit_models_keep_peft_bitsandbytes_layers(tiny_model_dir, tmp_path):
    """bitsandbytes' 4-bit layers subclass nn.Linear: the fused layer must not claim them (QLoRA needs peft's)."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit

    model = wrapped(tiny_model_dir, tmp_path, model_flags={"load_in_4bit": True})
    assert set(lora_layers(model)) == {Linear4bit}
