"""Load tokenizers and models (dtype, attention kernel, 4/8-bit, device placement) and wrap them with LoRA.

Wherever a model path is expected, a LoRA adapter directory works too: its base model is read from
`adapter_config.json`, the adapter is loaded on top and merged, so the next stage trains on the result. An adapter
trained on such a merge records the adapter directory as its base, so chains (SFT adapter -> DPO adapter) load
whole.
"""

import importlib.util
import json
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medicalgpt.model_paths import check_model_path, recorded_base_path, resolve_adapter_base
from medicalgpt.precision import set_trainable_precision
from medicalgpt.sharding import gathered_for_change, input_rows

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_FLAG = "--model_name_or_path"  # named in a model-path error when the path was not typed after another flag


def read_adapter_base(path):
    """The base model an adapter directory was trained on, or None when `path` is not an adapter directory. A relative
    base (older adapters) is resolved from here or beside the adapter (medicalgpt.model_paths)."""
    config_file = os.path.join(path, ADAPTER_CONFIG) if path else None
    if not config_file or not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file}: no base_model_name_or_path; pass the base model explicitly.")
    return resolve_adapter_base(path, base)


def check_paths(model_args, path, flag=None):
    """`path` (and, for an adapter directory, the base it names) can be loaded; else a one-line ModelPathError."""
    check_model_path(path, flag, model_args.cache_dir, model_args.model_revision)
    base = read_adapter_base(path)
    if base:
        check_model_path(base, cache_dir=model_args.cache_dir, revision=model_args.model_revision, named_by=path)


def load_tokenizer(model_args, path=None):
    """The tokenizer of `path` (default: --tokenizer_name_or_path, else the model); an adapter directory's own
    tokenizer is preferred, since the stage that wrote it may have changed it (vocabulary, chat template)."""
    flag = None if path else "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else MODEL_FLAG
    path = path or model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not path:
        raise ValueError("--model_name_or_path is required")
    check_model_path(path, flag, model_args.cache_dir, model_args.model_revision)
    if read_adapter_base(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        check_paths(model_args, path)
        path = read_adapter_base(path)
    tokenizer = AutoTokenizer.from_pretrained(
        path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("The tokenizer has no pad token: using %r", tokenizer.pad_token)
    return tokenizer


def resolve_dtype(name):
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def resolve_attention(model_args):
    """The attention kernel: --attn_implementation, which --flash_attn sets (medicalgpt/parser.py). FlashAttention-2
    asked for with --flash_attn falls back to sdpa, with a warning, where CUDA or the flash-attn package is missing."""
    attention = model_args.attn_implementation
    if attention != "flash_attention_2" or not model_args.flash_attn:
        return attention
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return attention
    if int(os.environ.get("RANK", "0")) == 0:  # said once, not by every data-parallel rank
        logger.warning("--flash_attn needs CUDA and the flash-attn package (pip install flash-attn); using sdpa.")
    return "sdpa"


def resolve_device_map(device_map):
    """Where to load the weights. DeepSpeed ZeRO-3 and FSDP shard and place them themselves (transformers refuses a
    device_map under ZeRO-3); data parallel ranks each take their own GPU; on CPU the Trainer places the model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    # FSDP: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP; `--fsdp` sets
    # FSDP_CPU_RAM_EFFICIENT_LOADING (transformers 5.23 TrainingArguments, before any model is loaded).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    fsdp = fsdp or "FSDP_CPU_RAM_EFFICIENT_LOADING" in os.environ
    if not torch.cuda.is_available() or is_deepspeed_zero3_enabled() or fsdp:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return device_map


def build_quantization_config(model_args, compute_dtype):
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install -r requirements-gpu.txt")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
    )


def load_model(model_args, path=None, model_class=AutoModelForCausalLM, **model_kwargs):
    """Load `path` (default --model_name_or_path). An adapter directory is loaded onto its base and merged."""
    path = path or model_args.model_name_or_path
    if not path:
        raise ValueError("--model_name_or_path is required")
    check_paths(model_args, path, MODEL_FLAG)
    adapter_base = read_adapter_base(path)
    dtype = resolve_dtype(model_args.torch_dtype)
    kwargs = dict(
        dtype=dtype,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        device_map=resolve_device_map(model_args.device_map),
    )
    quantization = build_quantization_config(model_args, dtype)
    if quantization is not None:  # an explicit None would also drop the config of a saved 4/8-bit model
        kwargs["quantization_config"] = quantization
    attention = resolve_attention(model_args)
    if attention:
        kwargs["attn_implementation"] = attention
    kwargs.update(model_kwargs)
    if adapter_base and read_adapter_base(adapter_base):
        model = load_model(model_args, adapter_base, model_class, **model_kwargs)  # a chain of adapters
    else:
        model = model_class.from_pretrained(adapter_base or path, **kwargs)
    if adapter_base:
        fit_embeddings_to_adapter_tokenizer(model, path, model_args)
        model = merge_adapter(model, path, quantized=quantization is not None)
    return model


def fit_embeddings_to_adapter_tokenizer(model, adapter_path, model_args):
    """An adapter trained after a vocabulary extension (build_domain_tokenizer.py) saved its larger tokenizer: grow
    the base model's embeddings to it, new rows initialised as training initialised them, before merging."""
    if not os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")):
        return
    from medicalgpt.data.vocab import resize_embeddings_for_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=model_args.trust_remote_code)
    if len(tokenizer) > input_rows(model):
        resize_embeddings_for_tokenizer(model, tokenizer)
        say_rows_come_from_adapter(adapter_path)


def load_model_with_adapter(
    model_args, adapter_path, model_class=AutoModelForCausalLM, tokenizer=None, **model_kwargs
):
    """`--base_model X --lora_model Y`: load X (--model_name_or_path) and merge adapter Y onto it. When Y was trained
    on another adapter directory (SFT adapter -> DPO adapter), that one is merged first, onto X as well.

    With `tokenizer`, the base model's embeddings first grow to fit it, new rows initialised exactly as the training
    scripts initialised them (medicalgpt.data.vocab), so an adapter trained after a vocabulary extension fits."""
    check_model_path(adapter_path, cache_dir=model_args.cache_dir)  # its recorded base matters only in a chain
    inner = read_adapter_base(adapter_path)
    base = model_args.model_name_or_path
    if inner and read_adapter_base(inner) and not _same_path(inner, base):
        model = load_model_with_adapter(model_args, inner, model_class, tokenizer, **model_kwargs)
    else:
        model = load_model(model_args, model_class=model_class, **model_kwargs)
        if tokenizer is not None:
            from medicalgpt.data.vocab import resize_embeddings_for_tokenizer

            if resize_embeddings_for_tokenizer(model, tokenizer):
                say_rows_come_from_adapter(adapter_path)
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    return merge_adapter(model, adapter_path, quantized=quantized)


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


def _same_path(a, b):
    """Whether two model paths name the same folder (an adapter's recorded base given again as the base model: it
    loads whole, chain included, and must not be merged a second time)."""
    return bool(a and b) and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


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


def split_names(text):
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def wrap_with_lora(model, lora_args, training_args, base_path, task_type="CAUSAL_LM"):
    """LoRA (QLoRA on a 4/8-bit model) or, without --use_peft, the model itself for full fine-tuning.
    `base_path` is what the adapter will name as its base: the path the model was loaded from (a folder is recorded
    as an absolute path, so the adapter loads from any working directory)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

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
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    else:
        model = get_peft_model(model, build_lora_config(lora_args, task_type))
    model.peft_config["default"].base_model_name_or_path = recorded_base_path(base_path)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("Trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / total)
    return set_trainable_precision(model, lora_args, training_args)  # float32 adapters (medicalgpt/precision.py)
