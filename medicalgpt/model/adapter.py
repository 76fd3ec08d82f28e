"""LoRA adapters: the base an adapter directory names, an adapter merged onto its base, and a model wrapped with
LoRA for training.

An adapter trained after a vocabulary extension saved its larger tokenizer: the base model's embeddings grow to it
before the merge (medicalgpt.model.embeddings), new rows initialised as training initialised them.
"""

import json
import logging
import os

from transformers import AutoTokenizer

from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer
from medicalgpt.model.paths import recorded_base_path, resolve_adapter_base
from medicalgpt.precision import set_trainable_precision
from medicalgpt.sharding import gathered_for_change, input_rows

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_base(path):
    """The base model an adapter directory was trained on, or None when `path` is not an adapter directory. A relative
    base (older adapters) is resolved from here or beside the adapter (medicalgpt.model.paths)."""
    config_file = os.path.join(path, ADAPTER_CONFIG) if path else None
    if not config_file or not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file}: no base_model_name_or_path; pass the base model explicitly.")
    return resolve_adapter_base(path, base)


def fit_embeddings_to_adapter_tokenizer(model, adapter_path, model_args):
    """An adapter trained after a vocabulary extension (build_domain_tokenizer.py) saved its larger tokenizer: grow
    the base model's embeddings to it, new rows initialised as training initialised them, before merging."""
    if not os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")):
        return
    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=model_args.trust_remote_code)
    if len(tokenizer) > input_rows(model):  # ZeRO-3: ds_shape (medicalgpt/sharding.py)
        resize_embeddings_for_tokenizer(model, tokenizer)
        say_rows_come_from_adapter(adapter_path)


def say_rows_come_from_adapter(adapter_path):
    """After the resize's "rows initialised" warning: when the adapter saved trained embeddings, those replace the
    initialised rows in the merge, and the user is told so."""
    with open(os.path.join(adapter_path, ADAPTER_CONFIG), encoding="utf-8") as f:
        saved = set(json.load(f).get("modules_to_save") or []) & {"embed_tokens", "lm_head"}
    if saved:
        logger.warning(
            "... and then replaced: %s saved its trained %s, which the merge loads over those initial rows.",
            adapter_path,
            " and ".join(sorted(saved)),
        )


def merge_adapter(model, adapter_path, quantized=False):
    """Load a LoRA adapter onto `model` and merge it. A causal-LM adapter (SFT) also fits a sequence-classification
    model of the same backbone (reward modeling on the SFT model): only its shared weights are merged."""
    from peft import PeftConfig, PeftModel

    logger.info("Loading the LoRA adapter %s onto its base model %s", adapter_path, read_adapter_base(adapter_path))
    config = PeftConfig.from_pretrained(adapter_path)
    if config.task_type == "CAUSAL_LM" and not model.can_generate():
        config.task_type = None
        config.modules_to_save = [
            m for m in config.modules_to_save or [] if m not in ("lm_head", "embed_tokens")
        ] or None
    model = PeftModel.from_pretrained(model, adapter_path, config=config)
    if quantized:
        logger.warning("Merging %s into quantized weights: rounding makes the merge approximate.", adapter_path)
    with gathered_for_change(model):  # ZeRO-3: merged into whole weights, partitioned again after
        model = model.merge_and_unload()
    for parameter in model.parameters():  # peft froze the base; a loaded model is trainable, like from_pretrained's
        parameter.requires_grad_(parameter.is_floating_point())
    return model


def build_lora_config(lora_args, task_type="CAUSAL_LM"):
    from peft import LoraConfig

    target_modules = lora_args.target_modules.strip()
    modules_to_save = split_names(lora_args.modules_to_save)
    return LoraConfig(
        task_type=task_type,
        # Qwen's small models tie embed_tokens and lm_head: train and save them as one matrix, as they are.
        ensure_weight_tying=bool(set(modules_to_save or []) & {"embed_tokens", "lm_head"}),
        r=lora_args.lora_rank,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules="all-linear" if target_modules == "all" else split_names(target_modules),
        modules_to_save=modules_to_save,
    )


def fused(config, quantized):
    """`config` training LoRA layers with fewer passes over the activations (medicalgpt/model/fused_lora.py), unless
    the model is 4/8-bit (bitsandbytes' layers need peft's own LoRA classes) or the adapter is not LoRA."""
    from peft import LoraConfig

    from medicalgpt.model.fused_lora import use_fused_lora_linear

    return use_fused_lora_linear(config) if isinstance(config, LoraConfig) and not quantized else config


def split_names(text):
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def wrap_with_lora(model, lora_args, training_args, base_path, task_type="CAUSAL_LM"):
    """LoRA (QLoRA on a 4/8-bit model) or, without --use_peft, the model itself for full fine-tuning.
    `base_path` is what the adapter will name as its base: the path the model was loaded from (a folder is recorded
    as an absolute path, so the adapter loads from any working directory)."""
    from peft import PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if not lora_args.use_peft and not lora_args.peft_path:
        if quantized:
            raise ValueError("A 4/8-bit model cannot be fully fine-tuned: add --use_peft True (QLoRA).")
        return set_trainable_precision(model, lora_args, training_args)  # float32 weights (medicalgpt/precision.py)
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
    if lora_args.peft_path:
        logger.info("Continuing training of the LoRA adapter %s", lora_args.peft_path)
        config = PeftConfig.from_pretrained(lora_args.peft_path)
        model = PeftModel.from_pretrained(
            model, lora_args.peft_path, config=fused(config, quantized), is_trainable=True
        )
    else:
        model = get_peft_model(model, fused(build_lora_config(lora_args, task_type), quantized))
    model.peft_config["default"].base_model_name_or_path = recorded_base_path(base_path)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    logger.debug("Trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / total)
    return set_trainable_precision(model, lora_args, training_args)  # float32 adapters (medicalgpt/precision.py)
