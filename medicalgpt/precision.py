"""Which dtype each weight is kept in, computed in and saved in.

Released checkpoints ship bf16 weights (Qwen2.5: `"torch_dtype": "bfloat16"`) and `--torch_dtype auto` loads them
so. AdamW updating bf16 weights rounds every update to bf16's 8-bit mantissa: an update below ~1/256 of a weight
vanishes (2 full SFT steps at lr 1e-5 changed 15.5% of a bf16 model's weights). So, as upstream MedicalGPT
(`model.float()`) and LLaMA-Factory do:

- Trainable parameters are kept in float32 whatever the checkpoint's dtype: full training upcasts the whole model;
  LoRA the adapters (peft does already) and `--modules_to_save`. Frozen weights (LoRA's base, the DPO reference, the
  teacher, the reward model) stay in the checkpoint's dtype, except without autocast (CPU): LoRA's base, as a float32
  module (`--modules_to_save`, a reward head) cannot take bf16 layers' activations, and the DPO / KTO / PPO
  reference (set_frozen_precision), which must compute as the upcast policy does, are float32 too there.
- The compute is bf16 / fp16 autocast where the device supports it (`--bf16`, `--fp16`; medicalgpt/device.py).
- `--pure_bf16 True`: the trainable parameters in bf16 too (weights, gradients and AdamW's states: 8 bytes per
  parameter instead of 16), for those who need the memory and accept the lost updates.
- DeepSpeed with bf16 / fp16 keeps its own float32 master weights and casts the module itself; under ZeRO-3 the
  weights were partitioned at load in DeepSpeed's dtype. Nothing is cast here then: no double cast.
- Outputs (`--save_dtype auto`): a fully trained model is saved in the checkpoint's own dtype, so a bf16 model stays
  a bf16 folder; a LoRA adapter in float32, as trained (peft's default; the merge casts to the base's dtype).
  `--save_dtype float32` (or bfloat16, float16) saves either in that dtype. The `checkpoint-N` folders keep the
  training dtype, so a resume continues from exactly the trained weights.
"""

import json
import logging
import os
import weakref
from collections import Counter

import torch

logger = logging.getLogger("medicalgpt")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_output_dtypes = weakref.WeakKeyDictionary()  # trained model -> the dtype its final weights are saved in


def loaded_dtype(model):
    """The checkpoint's dtype as loaded: what the model's config says (ZeRO-3 may have partitioned the weights in
    another), else the dtype most of its floating-point weights have."""
    dtype = getattr(model.config, "dtype", None)
    dtype = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if dtype in DTYPES.values():
        return dtype
    counts = Counter()
    for parameter in model.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def deepspeed_owns_precision(training_args):
    """DeepSpeed keeps float32 master weights under bf16 / fp16 and casts the module itself; under ZeRO-3 the weights
    were partitioned at load, in DeepSpeed's dtype (float32 without bf16 / fp16)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    deepspeed = getattr(training_args, "deepspeed", None)
    mixed = getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False)
    return bool(deepspeed) and (mixed or is_deepspeed_zero3_enabled())


def set_trainable_precision(model, lora_args, training_args):
    """Cast the trainable parameters of `model` (after LoRA wrapping, if any) as the module docstring says, record
    the dtype its final weights are saved in (SaveInOutputDtype), and log both. Returns the model."""
    lora = bool(lora_args.use_peft or lora_args.peft_path)
    loaded = loaded_dtype(model)
    save_dtype = getattr(lora_args, "save_dtype", "auto")
    _output_dtypes[model] = DTYPES[save_dtype] if save_dtype != "auto" else torch.float32 if lora else loaded
    kept = torch.bfloat16 if lora_args.pure_bf16 else torch.float32
    if deepspeed_owns_precision(training_args):
        where = "DeepSpeed's dtype (float32 master weights under bf16 / fp16; nothing cast here)"
    else:
        # Without autocast the frozen weights are cast too: a float32 module (--modules_to_save, a reward head)
        # cannot take the activations of bf16 layers, and the compute is float32 anyway (CPU).
        autocast = getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False)
        for parameter in model.parameters():
            if (parameter.requires_grad or not autocast) and parameter.is_floating_point() and parameter.dtype != kept:
                parameter.data = parameter.data.to(kept)
        if not lora and not lora_args.pure_bf16:
            model.float()  # buffers too (rotary frequencies): a bf16 checkpoint then trains as its float32 copy
        where = f"{str(kept).removeprefix('torch.')}{' (--pure_bf16)' if lora_args.pure_bf16 else ''}"
    logger.info(describe_precision(model, where, training_args))
    return model


def set_frozen_precision(model, training_args):
    """A frozen model beside the trained one (DPO / KTO's reference) computes as the policy does: without autocast
    (CPU) in float32, or a bf16 reference and its float32-upcast policy disagree at step 0 (DPO's first loss is not
    ln 2); under autocast, or when DeepSpeed owns the precision, it keeps the checkpoint's dtype. Returns the model."""
    autocast = getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False)
    if not autocast and not deepspeed_owns_precision(training_args) and loaded_dtype(model) != torch.float32:
        model.float()
    return model


def describe_precision(model, where, training_args):
    """One line: what is kept in which dtype, what the compute runs in, what the outputs are saved in."""
    frozen = Counter(str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad)
    frozen_text = ", ".join(f"{dtype}" for dtype in sorted(frozen)) or "none"
    compute = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "no autocast"
    saved = str(_output_dtypes[model]).removeprefix("torch.")
    return (
        f"Precision: trainable parameters in {where}; frozen weights in {frozen_text}; compute: {compute}; the final "
        f"weights are saved in {saved} (--save_dtype), checkpoint-N folders in the training dtype."
    )


def output_dtype(model):
    """The dtype `model`'s final weights are saved in (set_trainable_precision), or None when it was not recorded."""
    return _output_dtypes.get(model)


def cast_floating(state_dict, dtype, names=None):
    """`state_dict` with its floating-point tensors (those in `names`, when given) in `dtype`; tensors that share
    storage (tied embeddings) are cast once and stay shared."""
    cast = {}

    def to_dtype(name, tensor):
        if not tensor.is_floating_point() or tensor.dtype == dtype or (names is not None and name not in names):
            return tensor
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in cast:
            cast[key] = tensor.to(dtype)
        return cast[key]

    return {name: to_dtype(name, tensor) for name, tensor in state_dict.items()}


def write_config_dtype(folder, dtype):
    """config.json names the dtype of the weights beside it (save_pretrained wrote the in-memory model's)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return  # an adapter folder: adapter_config.json names no dtype
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def state_dict_for_output(model, state_dict=None):
    """(`state_dict` (default: the model's) in output_dtype(model), that dtype); unchanged and None when the model
    recorded none. A LoRA model's frozen base is not cast: only the trained tensors are saved (a float32 copy of a 7B
    base would be 28 GB for nothing)."""
    dtype = output_dtype(model)
    if dtype is None:
        return state_dict, None
    state_dict = model.state_dict() if state_dict is None else state_dict
    peft = hasattr(model, "peft_config")
    names = {name for name, p in model.named_parameters() if p.requires_grad} if peft else None
    return cast_floating(state_dict, dtype, names), dtype


class SaveInOutputDtype:
    """Trainer mixin: the final `save_model()` writes the weights in output_dtype(model) and says so in config.json;
    the checkpoints the Trainer saves while training (`_internal_call`) keep the training dtype.

    Written against transformers 5.23: `Trainer.save_model` hands every backend's state dict (DeepSpeed's gathered
    one included) to `_save`, or None for a plain model, which `_save` then reads from `self.model`
    (tests/test_precision.py fails when that changes)."""

    _save_dtype = None

    def save_model(self, output_dir=None, _internal_call=False):
        self._save_dtype = None if _internal_call else output_dtype(self.model)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            dtype, self._save_dtype = self._save_dtype, None
        if dtype is not None and self.args.should_save:
            write_config_dtype(output_dir or self.args.output_dir, dtype)
            logger.info("Final weights saved in %s.", str(dtype).removeprefix("torch."))

    def _save(self, output_dir=None, state_dict=None):
        if self._save_dtype is not None and self.args.should_save:
            state_dict, _ = state_dict_for_output(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict)
