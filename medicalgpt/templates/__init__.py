"""Conversation templates: how a chat is turned into the text a model is trained on and prompted with.

Two APIs over the same templates:

* MedicalGPT's pair API: ``get_conv_template(name).get_prompt([[user, assistant], ...], system_prompt)``; an empty
  (or None) last answer leaves the prompt ready for the model to answer.
* A role API for training: ``render_turns(messages, system_prompt, tools)`` takes ``{"role", "content"}`` messages
  (roles ``user``, ``assistant``, ``function_call``, ``observation``) and returns one ``(prompt, response)`` pair per
  exchange. ``response`` is exactly what the model must learn: the answer and the end-of-turn ``stop_str``.

``system_prompt=None`` uses the template's default; ``""`` renders no system block, except in templates whose
official rendering always has one (``qwen``: an empty ``<|im_start|>system`` block, as Qwen2.5's own template
renders an empty system message). Contents are inserted verbatim (no ``str.format``); only ``llama3`` trims them,
as Meta's template does.

Tools use one format for every template, the one Qwen2.5/Qwen3 were trained on (so ``qwen`` and ``qwen3`` match
their official templates exactly):

* ``tools`` (a JSON list of function schemas) is appended to the system prompt: a ``# Tools`` section listing one
  schema per line inside ``<tools></tools>``, then the instruction to answer with ``<tool_call>`` blocks.
* a ``function_call`` message (content ``{"name": ..., "arguments": ...}``, or a list of them) is the assistant
  answer ``<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>``, one block per call joined by "\\n".
* an ``observation`` message is the user turn ``<tool_response>\\nCONTENT\\n</tool_response>``.

BOS-like prefixes that the tokenizer adds itself (``<s>``, ``<|begin_of_text|>``, chatglm3's ``[gMASK]sop``) are not
part of the rendered text.
"""

import json
from dataclasses import dataclass

__all__ = [
    "ConversationTemplate",
    "Conversation",
    "TokenizerTemplate",
    "conv_templates",
    "get_conv_template",
    "register_conv_template",
    "template_from_tokenizer",
    "build_template",
    "leading_bos",
]

PLACEHOLDER = "{content}"
USER_ROLES = ("user", "observation")
ASSISTANT_ROLES = ("assistant", "function_call")

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"
CALL_ERROR = 'function_call content must be JSON {"name": ..., "arguments": ...} or a list of them, got '


# ---------------------------------------------------------------------------------------------------------------------
# Message helpers shared by both template kinds
# ---------------------------------------------------------------------------------------------------------------------


def _fill(fmt: str, content: str) -> str:
    """Insert `content` verbatim at the single {content} placeholder of `fmt`."""
    return fmt.replace(PLACEHOLDER, content)


def _parse_tools(tools) -> list:
    """Tools as a list of schemas: accepts a JSON string, a list, or None/""."""
    if not tools:
        return []
    if isinstance(tools, str):
        tools = json.loads(tools)
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a JSON list of function schemas, got {type(tools).__name__}")
    return tools


def _parse_tool_calls(content: str) -> list[tuple[str, object]]:
    """A function_call message's content -> [(name, arguments)]."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as error:
        raise ValueError(CALL_ERROR + repr(content)) from error
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
        raise ValueError(CALL_ERROR + repr(content))
    return [(call["name"], _parse_arguments(call.get("arguments", {}))) for call in calls]


def _is_call(call) -> bool:
    return isinstance(call, dict) and isinstance(call.get("name"), str)


def _parse_arguments(arguments):
    """Tool-call arguments; a JSON string (OpenAI style) is decoded."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError as error:
        raise ValueError(f"function_call arguments must be a JSON object: {arguments!r}") from error


def format_tools(tools: list) -> str:
    """The `# Tools` system section: one JSON schema per line inside <tools></tools>."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def format_tool_calls(content: str) -> str:
    """A function_call message's content -> `<tool_call>` blocks, as Qwen's template renders tool calls."""
    blocks = []
    for name, arguments in _parse_tool_calls(content):
        call = '{"name": "' + name + '", "arguments": ' + json.dumps(arguments, ensure_ascii=False) + "}"
        blocks.append("<tool_call>\n" + call + "\n</tool_call>")
    return "\n".join(blocks)


def format_observation(content: str) -> str:
    """A tool result -> the `<tool_response>` block sent as the user turn."""
    return "<tool_response>\n" + content + "\n</tool_response>"


def _check_roles(messages: list[dict]) -> None:
    """Messages must alternate user-side / assistant-side, starting with user-side."""
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        expected = USER_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        role = message.get("role")
        if role not in expected:
            raise ValueError(
                f"message {index} has role {role!r}, expected one of {expected}: messages must alternate "
                f"user-side {USER_ROLES} and assistant-side {ASSISTANT_ROLES}, starting with user-side"
            )


def _exchanges(messages: list[dict]) -> list[tuple[dict, dict | None]]:
    """Validated messages -> [(user-side message, assistant-side message or None)]."""
    _check_roles(messages)
    return [(messages[i], messages[i + 1] if i + 1 < len(messages) else None) for i in range(0, len(messages), 2)]


def _pairs_to_messages(pairs) -> list[dict]:
    """MedicalGPT's [[user, assistant], ...] -> role messages; an empty/None last answer is left out."""
    messages = []
    for index, (query, answer) in enumerate(pairs):
        messages.append({"role": "user", "content": query})
        if answer or index < len(pairs) - 1:
            messages.append({"role": "assistant", "content": answer or ""})
    return messages


class _PromptMethods:
    """get_prompt / get_dialog / render, built on `render_turns` and `closing_suffix`."""

    closing_suffix = ""

    def render(self, messages: list[dict], system_prompt: str | None = None, tools=None) -> str:
        """The whole conversation as text (with the closing suffix when it ends with an answer)."""
        text = "".join(prompt + response for prompt, response in self.render_turns(messages, system_prompt, tools))
        if messages[-1]["role"] in ASSISTANT_ROLES:
            text += self.closing_suffix
        return text

    def get_prompt(self, messages, system_prompt: str | None = None) -> str:
        """[[user, assistant], ...] -> text; ends with the generation prompt when the last answer is empty."""
        return self.render(_pairs_to_messages(messages), system_prompt)

    def get_dialog(self, messages, system_prompt: str | None = None) -> list[str]:
        """[[user, assistant], ...] -> [prompt, answer, prompt, answer, ...] (answers end with stop_str)."""
        turns = self.render_turns(_pairs_to_messages(messages), system_prompt)
        return [piece for turn in turns for piece in turn]


# ---------------------------------------------------------------------------------------------------------------------
# Built-in templates
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationTemplate(_PromptMethods):
    """A chat format. Every *_format string holds exactly one {content} placeholder.

    A conversation renders as: system block, then per exchange [separator (from the 2nd on)] user block, answer,
    stop_str; then closing_suffix after the last answer.
    """

    name: str
    # The user turn followed by the assistant header (the generation prompt).
    user_format: str
    # End of an assistant turn; generation stops here.
    stop_str: str
    system_format: str = PLACEHOLDER
    default_system_prompt: str = ""
    # Between an answer's stop_str and the next user block.
    separator: str = ""
    # After the last answer of a complete conversation (e.g. chatml's final "\n").
    closing_suffix: str = ""
    # User block of the first exchange, when it differs (chatglm3: later ones start after the "<|user|>" stop_str).
    first_user_format: str | None = None
    # Put the system block inside the first user turn (llama2, mistral) instead of before it.
    system_in_first_user: bool = False
    # Render the system block even for an empty system prompt (Qwen2.5 always has one).
    keep_empty_system: bool = False
    # Strip whitespace around every content, as templates using Jinja's `| trim` do (llama3).
    strip_content: bool = False
    # Qwen3 reasoning: None = no think blocks; True = thinking mode; False = no-thinking mode.
    thinking: bool | None = None

    def __post_init__(self):
        for field_name in ("user_format", "system_format", "first_user_format"):
            fmt = getattr(self, field_name)
            if fmt is not None and fmt.count(PLACEHOLDER) != 1:
                raise ValueError(f"template {self.name!r}: {field_name} must contain {PLACEHOLDER} exactly once")

    def render_turns(
        self, messages: list[dict], system_prompt: str | None = None, tools=None
    ) -> list[tuple[str, str]]:
        """Role messages -> [(prompt_text, response_text)], one pair per user-side/assistant-side exchange."""
        exchanges = _exchanges(messages)
        system_block = self._system_block(system_prompt, _parse_tools(tools))
        queries = [index for index, (query, _) in enumerate(exchanges) if query["role"] == "user"]
        last_query = queries[-1] if queries else len(exchanges)
        turns = []
        for index, (query, reply) in enumerate(exchanges):
            prompt = self._prompt(index, self._user_content(query), system_block)
            is_last = index == len(exchanges) - 1
            if self.thinking is None:
                response = "" if reply is None else self._answer(reply) + self.stop_str
            else:
                prompt, response = self._think_turn(prompt, reply, is_last, index >= last_query)
            turns.append((prompt, response))
        return turns

    def _clean(self, content: str) -> str:
        return content.strip() if self.strip_content else content

    def _system_block(self, system_prompt: str | None, tools: list) -> str:
        system = self.default_system_prompt if system_prompt is None else system_prompt
        if tools:
            keep = system or self.keep_empty_system
            system = (system + "\n\n" if keep else "") + format_tools(tools)
        if not system and not self.keep_empty_system:
            return ""
        return _fill(self.system_format, self._clean(system))

    def _user_content(self, message: dict) -> str:
        content = message["content"]
        if message["role"] == "observation":
            content = format_observation(content)
        return self._clean(content)

    def _answer(self, message: dict) -> str:
        if message["role"] == "function_call":
            return format_tool_calls(message["content"])
        return self._clean(message["content"])

    def _prompt(self, index: int, user_content: str, system_block: str) -> str:
        if index > 0:
            return self.separator + _fill(self.user_format, user_content)
        if self.system_in_first_user:
            return _fill(self.first_user_format or self.user_format, system_block + user_content)
        return system_block + _fill(self.first_user_format or self.user_format, user_content)

    def _think_turn(self, prompt: str, reply: dict | None, is_last: bool, after_last_query: bool) -> tuple[str, str]:
        """Qwen3: the answer after the last user query gets a <think> block; earlier answers lose their reasoning.

        Both modes render a conversation as the official template does (enable_thinking changes only its generation
        prompt). Thinking mode learns the (possibly empty) think block. No-thinking mode puts the empty think block
        into the prompt of a last answer that has no reasoning, like Qwen3's generation prompt with
        enable_thinking=False; a last answer that does carry reasoning keeps it, as the official template does.
        """
        if reply is None:
            return prompt + ("" if self.thinking else EMPTY_THINK), ""
        if reply["role"] == "function_call":
            reasoning, answer = "", format_tool_calls(reply["content"])
        else:
            reasoning, answer = _split_reasoning(reply["content"])
        if after_last_query and is_last and not self.thinking and not reasoning:
            prompt, answer = prompt + EMPTY_THINK, answer.lstrip("\n")
        elif after_last_query and (is_last or reasoning):
            answer = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
        return prompt, answer + self.stop_str


def _split_reasoning(content: str) -> tuple[str, str]:
    """'<think>R</think>A' -> (R, A), as Qwen3's template splits an answer; ('', content) without </think>."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


# Upstream MedicalGPT's class name.
Conversation = ConversationTemplate

# A global registry for all conversation templates.
conv_templates: dict[str, ConversationTemplate] = {}


def register_conv_template(template: ConversationTemplate, override: bool = False) -> None:
    """Register a template under its name; an existing name needs override=True."""
    if template.name in conv_templates and not override:
        raise ValueError(f"template {template.name!r} is already registered (pass override=True to replace it)")
    conv_templates[template.name] = template


def get_conv_template(name: str) -> ConversationTemplate:
    """The registered template called `name`."""
    if name not in conv_templates:
        raise ValueError(f"Unknown template {name!r}; known templates: {', '.join(sorted(conv_templates))}")
    return conv_templates[name]


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


# ---------------------------------------------------------------------------------------------------------------------
# A tokenizer's own chat template
# ---------------------------------------------------------------------------------------------------------------------

PROBE_ANSWER = "MEDICALGPT_PROBE_ANSWER"


class TokenizerTemplate(_PromptMethods):
    """render_turns / get_prompt / stop_str over a tokenizer's Jinja chat template (see template_from_tokenizer)."""

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "The tokenizer has no chat template: pass --template_name (known templates: "
                f"{', '.join(sorted(conv_templates))})"
            )
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        self.default_system_prompt = None
        self.stop_str, self.closing_suffix = self._probe_end_of_turn()

    def _apply(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        kwargs = dict(self.chat_template_kwargs)
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _probe_end_of_turn(self) -> tuple[str, str]:
        """(stop_str, closing_suffix) from rendering a one-exchange probe conversation."""
        user = {"role": "user", "content": "Hi"}
        prompt = self._apply([user], add_generation_prompt=True)
        full = self._apply([user, {"role": "assistant", "content": PROBE_ANSWER}], add_generation_prompt=False)
        if not full.startswith(prompt) or PROBE_ANSWER not in full[len(prompt) :]:
            raise ValueError("The tokenizer's chat template is not prefix-consistent: pass --template_name")
        tail = full[full.rindex(PROBE_ANSWER) + len(PROBE_ANSWER) :]
        marker = tail.rstrip()
        return marker.strip() or self.tokenizer.eos_token, tail[len(marker) :]

    def render_turns(
        self, messages: list[dict], system_prompt: str | None = None, tools=None
    ) -> list[tuple[str, str]]:
        """Role messages -> [(prompt_text, response_text)] by rendering growing prefixes of the conversation.

        system_prompt=None leaves the system prompt to the chat template; any string is sent as a system message.
        """
        exchanges = _exchanges(messages)
        tools = _parse_tools(tools)
        chat = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        done = ""
        turns = []
        for query, reply in exchanges:
            chat.append(_to_chat_message(query))
            prompt = self._extend(done, self._apply(chat, True, tools))
            response = ""
            if reply is not None:
                chat.append(_to_chat_message(reply))
                response = self._extend(done + prompt, self._apply(chat, False, tools)).rstrip()
            _check_rendered(query, prompt, reply, response)
            turns.append((prompt, response))
            done += prompt + response
        if any(_tool_name(tool) not in turns[0][0] for tool in tools):
            raise ValueError("The tokenizer's chat template does not render tools: pass --template_name")
        return turns

    @staticmethod
    def _extend(done: str, rendered: str) -> str:
        """The text `rendered` adds after `done`; raises unless `rendered` starts with `done`."""
        if not rendered.startswith(done):
            raise ValueError(
                "The tokenizer's chat template is not prefix-consistent (rendering more messages changes earlier "
                "text, e.g. Qwen3 drops earlier reasoning): pass --template_name"
            )
        return rendered[len(done) :]


def _to_chat_message(message: dict) -> dict:
    """A role message -> the message format of Hugging Face chat templates (tool_calls, `tool` role)."""
    role, content = message["role"], message["content"]
    if role == "function_call":
        calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in _parse_tool_calls(content)]
        return {"role": "assistant", "content": "", "tool_calls": calls}
    if role == "observation":
        return {"role": "tool", "content": content}
    return {"role": role, "content": content}


def _tool_name(tool: dict) -> str:
    """The function name of a tool schema ({"type": "function", "function": {...}} or a bare function schema)."""
    return str(tool.get("function", tool).get("name", ""))


def _check_rendered(query: dict, prompt: str, reply: dict | None, response: str) -> None:
    """Fail clearly when a chat template silently drops tool calls or tool results."""
    if query["role"] == "observation" and query["content"].strip() not in prompt:
        raise ValueError("The tokenizer's chat template does not render tool results: pass --template_name")
    if reply is not None and reply["role"] == "function_call":
        if any(name not in response for name, _ in _parse_tool_calls(reply["content"])):
            raise ValueError("The tokenizer's chat template does not render tool calls: pass --template_name")


def template_from_tokenizer(tokenizer, chat_template_kwargs: dict | None = None) -> TokenizerTemplate:
    """A template that renders with `tokenizer.apply_chat_template`.

    `chat_template_kwargs` go to every render, e.g. {"enable_thinking": False}.
    """
    return TokenizerTemplate(tokenizer, chat_template_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Choosing a template, and the BOS the tokenizer adds in front of it
# ---------------------------------------------------------------------------------------------------------------------


def build_template(template_name, tokenizer):
    """--template_name from template.py, else the tokenizer's own chat template; a usage error when neither works."""
    from medicalgpt.cli import UsageError

    try:
        return get_conv_template(template_name) if template_name else template_from_tokenizer(tokenizer)
    except ValueError as error:
        raise UsageError(str(error)) from error


def leading_bos(tokenizer, first_text):
    """[bos] when the tokenizer adds a BOS to plain text and the template text does not already start with it."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or first_text.startswith(tokenizer.bos_token or "\0"):
        return []
    return [bos_id] if tokenizer("x")["input_ids"][:1] == [bos_id] else []
