"""The messages every template takes, and `ConversationTemplate`: a chat format written as format strings, with the
registry of named templates (`register_conv_template`, `get_conv_template`; the built-in ones are in builtin.py)."""

from dataclasses import dataclass

from medicalgpt.templates.tool_format import format_observation, format_tool_calls, format_tools, parse_tools

PLACEHOLDER = "{content}"
USER_ROLES = ("user", "observation")
ASSISTANT_ROLES = ("assistant", "function_call")
EMPTY_THINK = "<think>\n\n</think>\n\n"


def fill(fmt: str, content: str) -> str:
    """Insert `content` verbatim at the single {content} placeholder of `fmt`."""
    return fmt.replace(PLACEHOLDER, content)


def check_roles(messages: list[dict]) -> None:
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


def split_exchanges(messages: list[dict]) -> list[tuple[dict, dict | None]]:
    """Validated messages -> [(user-side message, assistant-side message or None)]."""
    check_roles(messages)
    return [(messages[i], messages[i + 1] if i + 1 < len(messages) else None) for i in range(0, len(messages), 2)]


def pairs_to_messages(pairs) -> list[dict]:
    """MedicalGPT's [[user, assistant], ...] -> role messages; an empty/None last answer is left out."""
    messages = []
    for index, (query, answer) in enumerate(pairs):
        messages.append({"role": "user", "content": query})
        if answer or index < len(pairs) - 1:
            messages.append({"role": "assistant", "content": answer or ""})
    return messages


class PromptMethods:
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
        return self.render(pairs_to_messages(messages), system_prompt)

    def get_dialog(self, messages, system_prompt: str | None = None) -> list[str]:
        """[[user, assistant], ...] -> [prompt, answer, prompt, answer, ...] (answers end with stop_str)."""
        turns = self.render_turns(pairs_to_messages(messages), system_prompt)
        return [piece for turn in turns for piece in turn]


@dataclass(frozen=True)
class ConversationTemplate(PromptMethods):
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
        exchanges = split_exchanges(messages)
        system_block = self._system_block(system_prompt, parse_tools(tools))
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
        return fill(self.system_format, self._clean(system))

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
            return self.separator + fill(self.user_format, user_content)
        if self.system_in_first_user:
            return fill(self.first_user_format or self.user_format, system_block + user_content)
        return system_block + fill(self.first_user_format or self.user_format, user_content)

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
