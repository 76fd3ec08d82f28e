"""Load tokenizers and models (dtype, attention kernel, 4/8-bit, device placement); LoRA is medicalgpt.model.adapter.

Wherever a model path is expected, a LoRA adapter directory works too: its base model is read from
`adapter_config.json`, the adapter is loaded on top and merged, so the next stage trains on the result. An adapter
trained on such a merge records the adapter directory as its base, so chains (SFT adapter -> DPO adapter) load
whole.
"""

import importlib.util
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medicalgpt.model.adapter import (
    fit_embeddings_to_adapter_tokenizer,
    merge_adapter,
    read_adapter_base,
    say_rows_come_from_adapter,
)
from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer
from medicalgpt.model.paths import check_model_path

logger = logging.getLogger(__name__)

MODEL_FLAG = "--model_name_or_path"  # named in a model-path error when the path was not typed after another flag


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


def fsdp_requested():
    """Whether this run shards the model with FSDP: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP;
    `--fsdp` sets FSDP_CPU_RAM_EFFICIENT_LOADING (transformers 5.23 TrainingArguments, before any model is loaded)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return fsdp or "FSDP_CPU_RAM_EFFICIENT_LOADING" in os.environ


def resolve_device_map(device_map):
    """Where to load the weights. DeepSpeed ZeRO-3 and FSDP shard and place them themselves (transformers refuses a
    device_map under ZeRO-3); data parallel ranks each take their own GPU; on CPU the Trainer places the model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not torch.cuda.is_available() or is_deepspeed_zero3_enabled() or fsdp_requested():
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


def load_model_with_adapter(
    model_args, adapter_path, model_class=AutoModelForCausalLM, tokenizer=None, **model_kwargs
):
    """`--base_model X --lora_model Y`: load X (--model_name_or_path) and merge adapter Y onto it. When Y was trained
    on another adapter directory (SFT adapter -> DPO adapter), that one is merged first, onto X as well.

    With `tokenizer`, the base model's embeddings first grow to fit it, new rows initialised exactly as the training
    scripts initialised them (medicalgpt.model.embeddings), so an adapter trained after a vocabulary extension fits."""
    check_model_path(adapter_path, cache_dir=model_args.cache_dir)  # its recorded base matters only in a chain
    inner = read_adapter_base(adapter_path)
    base = model_args.model_name_or_path
    if inner and read_adapter_base(inner) and not _same_path(inner, base):
        model = load_model_with_adapter(model_args, inner, model_class, tokenizer, **model_kwargs)
    else:
        model = load_model(model_args, model_class=model_class, **model_kwargs)
        if tokenizer is not None:
            if resize_embeddings_for_tokenizer(model, tokenizer):
                say_rows_come_from_adapter(adapter_path)
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    return merge_adapter(model, adapter_path, quantized=quantized)


def _same_path(a, b):
    """Whether two model paths name the same folder (an adapter's recorded base given again as the base model: it
    loads whole, chain included, and must not be merged a second time)."""
    return bool(a and b) and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
