"""Merge a LoRA adapter into its base model: a plain transformers checkpoint any serving stack loads.

    python merge_peft_adapter.py --base_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --peft_model_path outputs-sft-qwen-v1 --output_dir merged-sft-qwen-v1
    python merge_peft_adapter.py --base_model Qwen/Qwen2.5-0.5B --lora_model outputs-pt-qwen-v1 \\
        --tokenizer_path ./tokenizer-extended --resize_emb --output_dir merged-pt-qwen-v1     # upstream's flags

Causal-LM adapters and sequence-classification ones (a reward model: task_type SEQ_CLS, its `score` head saved
with the adapter) are told apart by the adapter's `adapter_config.json`; the base model defaults to the one it
records. An adapter trained on another adapter directory brings that one too. The tokenizer (the adapter's own
when it saved one, else `--tokenizer_path` or the base model's) is written with the model; the embeddings grow
to fit it. The chat template: the tokenizer's own, else the Jinja form of `--template_name`. The generation config's
EOS list gets the template's end-of-turn token, so the merged model stops where it was trained to with plain
`generate`, vLLM or TGI. The output is written to a temporary folder and renamed when complete.
"""

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification

from medicalgpt.args import ModelArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.errors import UsageError
from medicalgpt.model.adapter import ADAPTER_CONFIG, read_adapter_base
from medicalgpt.model.loader import load_model_with_adapter, load_tokenizer
from medicalgpt.model.paths import check_model_path
from medicalgpt.parser import parse_cli
from medicalgpt.templates import build_template

logger = logging.getLogger("medicalgpt")


@dataclass
class MergeArguments:
    peft_model_path: str | None = field(default=None, metadata={"help": "The LoRA adapter directory to merge."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default: the base recorded in the adapter's config)."}
    )
    output_dir: str = field(default="./merged", metadata={"help": "Where the merged model goes (new or empty)."})
    lora_model: str | None = field(default=None, metadata={"help": "Upstream's name for --peft_model_path."})
    base_model: str | None = field(default=None, metadata={"help": "Upstream's name for --base_model_name_or_path."})
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the adapter's own when it saved one, else the base's)."}
    )
    template_name: str | None = field(
        default=None,
        metadata={
            "help": "Template whose end-of-turn token stops generation; its Jinja form becomes "
            "the chat template when the tokenizer has none."
        },
    )
    resize_emb: bool = field(
        default=False, metadata={"help": "Upstream's flag, accepted: the embeddings always grow to fit the tokenizer."}
    )
    torch_dtype: str | None = field(default=None, metadata={"help": "Dtype of the merged weights (default: base's)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})
    model_type: str | None = field(default=None, metadata={"help": "Upstream's flag, accepted and ignored."})


def chat_template_for(template):
    """The Jinja chat template that renders like a template.py ConversationTemplate (for tokenizers without one).
    Its user block ends with the assistant header, so the text is the same with or without add_generation_prompt."""
    if getattr(template, "thinking", None) is not None:
        raise UsageError(f"template {template.name!r} has reasoning blocks: give the tokenizer a chat template")
    lit = json.dumps  # a JSON string is a valid Jinja string literal
    user_pre, user_post = map(lit, template.user_format.split("{content}"))
    first_pre, first_post = map(lit, (template.first_user_format or template.user_format).split("{content}"))
    system_pre, system_post = map(lit, template.system_format.split("{content}"))
    trim = " | trim" if template.strip_content else ""
    keep = "true" if template.keep_empty_system else "false"
    separator = lit(template.separator)
    content = f"(message['content']{trim})"
    first = f"{first_pre} ~ system_block ~ {content} ~ {first_post}"
    if not template.system_in_first_user:
        first = f"system_block ~ {first_pre} ~ {content} ~ {first_post}"
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {lit(template.default_system_prompt)} -%}}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
        f"{{%- set system_block = ({system_pre} ~ (system{trim}) ~ {system_post}) if (system or {keep}) else '' -%}}"
        "{%- for message in loop_messages -%}"
        f"{{%- if message['role'] == 'user' and loop.first -%}}{{{{ {first} }}}}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{ {separator} ~ {user_pre} ~ {content} ~ {user_post} }}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {content} ~ {lit(template.stop_str)} }}}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' -%}"
        f"{{{{ {lit(template.closing_suffix)} }}}}{{%- endif -%}}"
    )


def read_task_type(adapter_path):
    with open(os.path.join(adapter_path, ADAPTER_CONFIG), encoding="utf-8") as f:
        return json.load(f).get("task_type") or "CAUSAL_LM"


def num_labels_of(adapter_path):
    """Rows of the classification head saved with a SEQ_CLS adapter (a reward model: 1)."""
    from safetensors import safe_open

    weights = os.path.join(adapter_path, "adapter_model.safetensors")
    if os.path.isfile(weights):
        with safe_open(weights, "pt") as f:
            heads = [f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith("score.weight")]
        if heads:
            return heads[0]
    return 1


def set_stop_tokens(model, tokenizer, template):
    """The generation config's EOS list: the model's, the tokenizer's EOS and the template's end-of-turn token."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop_ids = tokenizer.encode(template.stop_str, add_special_tokens=False) if template else []
    extra = [tokenizer.eos_token_id] + (stop_ids if len(stop_ids) == 1 else [])
    config.eos_token_id = list(dict.fromkeys(eos + [token for token in extra if token is not None]))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if template and len(stop_ids) != 1:
        logger.warning("The end-of-turn %r is not one token: generation must stop on that string.", template.stop_str)
    logger.info("generation_config.eos_token_id = %s", config.eos_token_id)


def load_merged(args, adapter, base):
    """(merged model, tokenizer, task type)."""
    model_args = ModelArguments(
        model_name_or_path=base, torch_dtype=args.torch_dtype, trust_remote_code=args.trust_remote_code
    )
    has_tokenizer = os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    tokenizer = load_tokenizer(model_args, args.tokenizer_path or (adapter if has_tokenizer else base))
    task_type = read_task_type(adapter)
    kwargs = {}
    if task_type == "SEQ_CLS":
        kwargs = dict(model_class=AutoModelForSequenceClassification, num_labels=num_labels_of(adapter))
    elif task_type != "CAUSAL_LM":
        raise UsageError(f"{adapter}: task_type {task_type!r} is not supported (CAUSAL_LM or SEQ_CLS)")
    logger.info("Merging the %s adapter %s into %s", task_type, adapter, base)
    model = load_model_with_adapter(model_args, adapter, tokenizer=tokenizer, **kwargs)
    if task_type == "SEQ_CLS":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, task_type


def main(argv=None):
    (args,) = parse_cli((MergeArguments,), argv, description=__doc__)
    setup_logging()
    adapter = args.peft_model_path or args.lora_model
    if not adapter or not read_adapter_base(adapter):
        raise UsageError(f"--peft_model_path must be a LoRA adapter directory (with {ADAPTER_CONFIG}): {adapter!r}")
    base = args.base_model_name_or_path or args.base_model or read_adapter_base(adapter)
    check_model_path(base, named_by=None if base != read_adapter_base(adapter) else adapter)
    output = os.path.normpath(args.output_dir)
    if os.path.isdir(output) and os.listdir(output) and not args.overwrite_output_dir:
        raise UsageError(f"{output} is not empty: choose a new --output_dir or pass --overwrite_output_dir")
    model, tokenizer, task_type = load_merged(args, adapter, base)
    template = None
    if args.template_name or tokenizer.chat_template:
        template = build_template(args.template_name, tokenizer)
    if args.template_name and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template_for(template)
    if task_type == "CAUSAL_LM":
        set_stop_tokens(model, tokenizer, template)
    partial = output + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with torch.no_grad():
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.replace(partial, output)
    logger.info("Merged model written to %s", output)


if __name__ == "__main__":
    sys.exit(run_cli(main))
