"""One generation engine for inference.py, gradio_demo.py and fastapi_server_demo.py.

    engine = load_chat_engine(ChatArguments(base_model="Qwen/Qwen2.5-0.5B-Instruct", lora_model="outputs-sft"))
    engine.generate([[{"role": "user", "content": "小孩发烧怎么办？"}]], GenerationOptions(temperature=0))
    for piece in engine.stream([{"role": "user", "content": "小孩发烧怎么办？"}], GenerationOptions()): ...

A conversation is a list of {"role", "content"} messages (user / assistant, a leading system message optional) that
ends with a user turn. It is rendered with the template and tokenised turn by turn exactly as SFT tokenised it, so
the model sees at inference what it was trained on. Generation stops at the template's end-of-turn token (and the
model's EOS tokens); batches are left-padded. Every use of the model holds one lock (`_lock`): a `model.generate`
call, a stream (chat_stream.py: generation in a thread, text as it is decoded, ended when the loop is left), or one
step of the server's and the web page's scheduler (scheduler.py), which interleaves their generations step by step.
"""

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from medicalgpt.args import ModelArguments
from medicalgpt.model.adapter import read_adapter_base
from medicalgpt.model.loader import load_model, load_model_with_adapter, load_tokenizer
from medicalgpt.model.paths import check_model_path
from medicalgpt.serve.chat_stream import ChatStream
from medicalgpt.serve.options import (  # noqa: F401 (GenerationOptions, Completion: imported from here by callers)
    ChatPrompt,
    Completion,
    GenerationOptions,
    PromptTooLongError,
    cut_at_stop,
)
from medicalgpt.templates import build_template, leading_bos

logger = logging.getLogger(__name__)


def model_loading_fields(*names, **helps):
    """A dataclass of ModelArguments' fields `names`, declared once in args.py, to inherit (help texts overridable)."""
    fields = []
    for source in dataclasses.fields(ModelArguments):
        if source.name in names:
            metadata = {**source.metadata, **({"help": helps[source.name]} if source.name in helps else {})}
            fields.append((source.name, source.type, field(default=source.default, metadata=metadata)))
    return dataclasses.make_dataclass("ModelLoadingArguments", fields)


ModelLoadingArguments = model_loading_fields(
    "torch_dtype",
    "load_in_4bit",
    "load_in_8bit",
    "trust_remote_code",
    torch_dtype="Weights dtype: auto, bfloat16, float16, float32 (default: float32 on CPU, else auto).",
    load_in_4bit="Load the weights in 4-bit NF4 (bitsandbytes).",
)


@dataclass(kw_only=True)
class ChatArguments(ModelLoadingArguments):
    """Model and sampling options shared by inference.py, gradio_demo.py and fastapi_server_demo.py. The loading
    options (--torch_dtype, --load_in_4bit, --load_in_8bit, --trust_remote_code) are ModelArguments' own."""

    base_model: str = field(metadata={"help": "Model path or hub name (a merged model, or the base of --lora_model)."})
    lora_model: str | None = field(
        default=None, metadata={"help": "LoRA adapter directory applied on top of --base_model (default: none)."}
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the adapter's own when it has one, else the model's)."}
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Conversation template from template.py (default: the tokenizer's own chat template)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt (default: the template's; a conversation's own wins)."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens generated per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 = greedy, deterministic."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set with this mass."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1 discourages repeats (1 = off)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})
    resize_emb: bool = field(
        default=False,
        metadata={"help": "Upstream's flag, accepted: the embeddings always grow to fit a larger tokenizer."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Upstream's flag, accepted and ignored: config.json names the architecture."}
    )

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("--temperature must be >= 0, --top_p in (0, 1] and --max_new_tokens >= 1")
        self.model_arguments()  # ModelArguments checks its own fields (--torch_dtype, 4-bit with 8-bit)

    def model_arguments(self):
        """The ModelArguments of --base_model: on the GPU unless --use_cpu or there is none (then float32)."""
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        return ModelArguments(
            model_name_or_path=self.base_model,
            torch_dtype=self.torch_dtype or ("auto" if on_gpu else "float32"),
            device_map="auto" if on_gpu else None,
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            trust_remote_code=self.trust_remote_code,
        )

    def generation_options(self, **overrides):
        values = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )
        return GenerationOptions(**{**values, **overrides})


def load_chat_engine(args: ChatArguments):
    """Tokenizer, template, model (+ the LoRA adapter, merged) -> a ChatEngine, on the GPU when there is one."""
    model_args = args.model_arguments()
    check_chat_paths(args)
    if args.lora_model and not read_adapter_base(args.lora_model):
        from medicalgpt.errors import UsageError

        raise UsageError(
            f"--lora_model {args.lora_model}: not a LoRA adapter directory (no adapter_config.json); "
            "pass a full model as --base_model"
        )
    tokenizer = load_tokenizer(model_args, tokenizer_source(args))
    template = build_template(args.template_name, tokenizer)
    if args.lora_model:
        model = load_model_with_adapter(model_args, args.lora_model, tokenizer=tokenizer)
    else:
        model = load_model(model_args)
    return ChatEngine(model, tokenizer, template, system_prompt=args.system_prompt)


def check_chat_paths(args):
    """--base_model, --lora_model and --tokenizer_path exist (or are loadable hub ids); else one line says which."""
    for flag, path in (
        ("--base_model", args.base_model),
        ("--lora_model", args.lora_model),
        ("--tokenizer_path", args.tokenizer_path),
    ):
        if path:
            check_model_path(path, flag)


def fit_context(engine, messages, max_new_tokens, system_prompt=None):
    """(the messages that fit the model's context with max_new_tokens to spare, how many of the oldest exchanges were
    left out). One behaviour for the terminal and the browser: the oldest user/assistant exchanges go first, a
    leading system message stays; PromptTooLongError when the last message alone does not fit."""
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    turns, dropped = list(messages[len(system) :]), 0
    while True:
        try:
            engine.check_length(len(engine.encode(system + turns, system_prompt)), max_new_tokens)
            return system + turns, dropped
        except PromptTooLongError:
            if len(turns) <= 1:
                raise
            turns, dropped = turns[2:], dropped + 1


def dropped_note(engine, dropped):
    """What the user is told when fit_context left exchanges out."""
    exchanges = "exchange is" if dropped == 1 else f"{dropped} exchanges are"
    return (
        f"The conversation no longer fits the model's context of {engine.context_length} tokens: its oldest "
        f"{exchanges} left out of what the model sees."
    )


def tokenizer_source(args):
    """--tokenizer_path, else the adapter directory when it holds a tokenizer (it may be extended), else the base."""
    if args.tokenizer_path:
        return args.tokenizer_path
    if args.lora_model and os.path.isfile(os.path.join(args.lora_model, "tokenizer_config.json")):
        return args.lora_model
    return args.base_model


class ChatEngine:
    def __init__(self, model, tokenizer, template, system_prompt=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids, self.stop_strings = self._template_stops()
        # generate() fills what a call leaves unset from the model's generation_config (Qwen2.5-Instruct's sets
        # top_k 20, top_p 0.8, repetition_penalty 1.05): emptied, so only the options a request or flag names apply.
        self.model.generation_config = GenerationConfig()
        self.context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self._lock = threading.Lock()  # one model.generate at a time
        self._tokenizer_lock = threading.Lock()
        logger.info("Generation stops at token ids %s and strings %s", self.stop_ids, self.stop_strings)

    def _template_stops(self):
        """End-of-turn token ids (the template's stop_str when it is one token, the model's EOS) and stop strings."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        ids += [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        stop = self.template.stop_str
        encoded = self.tokenizer.encode(stop, add_special_tokens=False) if stop else []
        strings = []
        if len(encoded) == 1:
            ids.append(encoded[0])
        elif stop:
            strings.append(stop)
        return list(dict.fromkeys(ids)), strings

    # -- prompts -----------------------------------------------------------------------------------------------

    def encode(self, messages, system_prompt=None):
        """Messages ending with a user turn (or a ChatPrompt) -> prompt token ids, tokenised turn by turn as in SFT."""
        if isinstance(messages, ChatPrompt):
            return self._encode(messages.messages, system_prompt, messages.tools, messages.answer_prefix)
        return self._encode(messages, system_prompt)

    def _encode(self, messages, system_prompt=None, tools=None, answer_prefix=""):
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            system_prompt, messages = messages[0]["content"], messages[1:]
        if not messages or messages[-1].get("role") not in ("user", "observation"):
            raise ValueError("the conversation must end with a user message")
        system = system_prompt if system_prompt is not None else self.system_prompt
        turns = self.template.render_turns(messages, system_prompt=system, tools=tools)
        with self._tokenizer_lock:
            ids = leading_bos(self.tokenizer, turns[0][0])
            for prompt, response in turns:
                ids += self.tokenizer.encode(prompt, add_special_tokens=False)
                ids += self.tokenizer.encode(response, add_special_tokens=False) if response else []
            ids += self.tokenizer.encode(answer_prefix, add_special_tokens=False) if answer_prefix else []
        return ids

    def check_length(self, prompt_tokens, max_new_tokens):
        if prompt_tokens + max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens"
            )

    def generation_kwargs(self, options: GenerationOptions):
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.temperature > 0,
            repetition_penalty=options.repetition_penalty,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        if options.temperature > 0:  # top_k 0: transformers' global default would be 50
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=0)
        stops = [*self.stop_strings, *options.stop]
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        return kwargs

    def left_pad(self, encoded):
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        return input_ids.to(self.model.device), mask.to(self.model.device)

    # -- generation --------------------------------------------------------------------------------------------

    def generate(self, conversations, options: GenerationOptions, system_prompt=None):
        """Answer each conversation; one left-padded batch, one model.generate call."""
        encoded = [self.encode(messages, system_prompt) for messages in conversations]
        for ids in encoded:
            self.check_length(len(ids), options.max_new_tokens)
        input_ids, attention_mask = self.left_pad(encoded)
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **self.generation_kwargs(options)
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [self.completion_of(tokens, len(ids), options) for tokens, ids in zip(new_tokens, encoded)]

    def completion_of(self, tokens, prompt_tokens, options):
        end = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        if end is not None:
            tokens, count = tokens[:end], end + 1
        else:
            while tokens and tokens[-1] == self.pad_id:  # a row stopped by a stop string, padded to the batch
                tokens = tokens[:-1]
            count = len(tokens)
        with self._tokenizer_lock:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit = cut_at_stop(text, [*self.stop_strings, *options.stop])
        finish = "stop" if end is not None or hit or count < options.max_new_tokens else "length"
        return Completion(text, prompt_tokens, count, finish)

    def stream(self, messages, options: GenerationOptions, system_prompt=None):
        """A ChatStream: iterate it for text pieces as they are generated; `.completion` is set at the end."""
        ids = self.encode(messages, system_prompt)
        self.check_length(len(ids), options.max_new_tokens)
        return ChatStream(self, ids, options)
