"""The built-in templates, registered by name (`--template_name qwen`); each comment says what it matches."""

from medicalgpt.templates.conversation import PLACEHOLDER, ConversationTemplate, register_conv_template

CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"


def _chatml(name: str, default_system_prompt: str, **kwargs) -> ConversationTemplate:
    """A ChatML template: <|im_start|>role\\ncontent<|im_end|>\\n per message."""
    return ConversationTemplate(
        name=name,
        user_format=CHATML_USER,
        stop_str="<|im_end|>",
        system_format=CHATML_SYSTEM,
        default_system_prompt=default_system_prompt,
        separator="\n",
        closing_suffix="\n",
        **kwargs,
    )


# Vicuna v1.1 (FastChat): "SYSTEM USER: q ASSISTANT: a</s>USER: ...". The space after "ASSISTANT:" is in the prompt.
register_conv_template(
    ConversationTemplate(
        name="vicuna",
        default_system_prompt=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        system_format="{content} ",
        user_format="USER: {content} ASSISTANT: ",
        stop_str="</s>",
    )
)

# Plain text for base models: "S\n\nq1a1</s>q2a2</s>".
register_conv_template(
    ConversationTemplate(name="base", system_format="{content}\n\n", user_format=PLACEHOLDER, stop_str="</s>")
)

# Alpaca (Stanford).
register_conv_template(
    ConversationTemplate(
        name="alpaca",
        default_system_prompt=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
        system_format="{content}\n\n",
        user_format="### Instruction:\n{content}\n\n### Response:\n",
        stop_str="</s>",
        separator="\n\n",
    )
)

# Qwen2.5-Instruct: matches its official chat template (and therefore trl's qwen2_5.jinja) exactly.
register_conv_template(
    _chatml("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", keep_empty_system=True)
)

# Generic ChatML (Qwen1.5/Qwen2 style), no system block for an empty system prompt.
register_conv_template(_chatml("chatml", "You are a helpful assistant."))

# SmolLM2-Instruct (Hugging Face): ChatML with SmolLM's default system prompt; an empty system message is kept.
register_conv_template(
    _chatml("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face", keep_empty_system=True)
)

# Yi-Chat: ChatML without a default system prompt.
register_conv_template(_chatml("yi", ""))

# InternLM2-chat: ChatML with InternLM's default system prompt.
register_conv_template(_chatml("intern2", "You are an AI assistant whose name is InternLM (书生·浦语)."))

# Qwen3, thinking mode: matches the official template (trl's qwen3.jinja); the last answer has a <think> block.
register_conv_template(_chatml("qwen3", "", thinking=True))

# Qwen3 with enable_thinking=False: the empty think block ends the last prompt (an answer's reasoning is kept).
register_conv_template(_chatml("qwen3_nothink", "", thinking=False))

# Llama-2-chat (Meta): "[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1</s><s>[INST] q2 [/INST] a2</s>".
# The official template also strips contents and writes " a1 </s>"; here contents are verbatim and end at "</s>".
register_conv_template(
    ConversationTemplate(
        name="llama2",
        default_system_prompt=(
            "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
            "being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
            "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
            "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
            "something not correct. If you don't know the answer to a question, please don't share false information."
        ),
        system_format="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_first_user=True,
        user_format="[INST] {content} [/INST] ",
        stop_str="</s>",
        separator="<s>",
    )
)

# Llama-3-Instruct: matches Meta's template (trl's llama3.jinja) without its leading <|begin_of_text|>, which the
# tokenizer adds. Contents are trimmed as that template does.
register_conv_template(
    ConversationTemplate(
        name="llama3",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_format=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        stop_str="<|eot_id|>",
        strip_content=True,
    )
)

# Mistral-Instruct v0.1: "[INST] q1 [/INST]a1</s>[INST] q2 [/INST]". A system prompt opens the first user turn,
# followed by a blank line (as the v0.2+ templates do).
register_conv_template(
    ConversationTemplate(
        name="mistral",
        system_format="{content}\n\n",
        system_in_first_user=True,
        user_format="[INST] {content} [/INST]",
        stop_str="</s>",
    )
)

# DeepSeek-LLM-chat: "S\n\nUser: q1\n\nAssistant: a1<｜end▁of▁sentence｜>User: ...". The space after "Assistant:"
# is in the prompt.
register_conv_template(
    ConversationTemplate(
        name="deepseek",
        system_format="{content}\n\n",
        user_format="User: {content}\n\nAssistant: ",
        stop_str="<｜end▁of▁sentence｜>",
    )
)

# Baichuan-13B-Chat: <reserved_102> user, <reserved_103> assistant.
register_conv_template(
    ConversationTemplate(name="baichuan", user_format="<reserved_102>{content}<reserved_103>", stop_str="</s>")
)

# Baichuan2-Chat: <reserved_106> user, <reserved_107> assistant.
register_conv_template(
    ConversationTemplate(name="baichuan2", user_format="<reserved_106>{content}<reserved_107>", stop_str="</s>")
)

# ChatGLM3: "<|system|>\nS<|user|>\nq1<|assistant|>\na1<|user|>\nq2<|assistant|>\n". The model ends its turn by
# emitting the next role token <|user|>, so that is the stop_str and later user blocks start after it. The "\n" after
# <|assistant|> is in the prompt. The tokenizer adds the [gMASK]sop prefix.
register_conv_template(
    ConversationTemplate(
        name="chatglm3",
        system_format="<|system|>\n{content}",
        first_user_format="<|user|>\n{content}<|assistant|>\n",
        user_format="\n{content}<|assistant|>\n",
        stop_str="<|user|>",
    )
)
