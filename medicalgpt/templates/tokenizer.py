"""Templates from a tokenizer's own Jinja chat template, the choice between them and the named ones
(`build_template`), and the BOS a tokenizer adds in front of rendered text (`leading_bos`)."""

from medicalgpt.templates.conversation import PromptMethods, conv_templates, get_conv_template, split_exchanges
from medicalgpt.templates.tool_format import parse_tool_calls, parse_tools

PROBE_ANSWER = "MEDICALGPT_PROBE_ANSWER"


class TokenizerTemplate(PromptMethods):
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
        exchanges = split_exchanges(messages)
        tools = parse_tools(tools)
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
        calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in parse_tool_calls(content)]
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
        if any(name not in response for name, _ in parse_tool_calls(reply["content"])):
            raise ValueError("The tokenizer's chat template does not render tool calls: pass --template_name")


def template_from_tokenizer(tokenizer, chat_template_kwargs: dict | None = None) -> TokenizerTemplate:
    """A template that renders with `tokenizer.apply_chat_template`.

    `chat_template_kwargs` go to every render, e.g. {"enable_thinking": False}.
    """
    return TokenizerTemplate(tokenizer, chat_template_kwargs)


def build_template(template_name, tokenizer):
    """--template_name from template.py, else the tokenizer's own chat template; a usage error when neither works."""
    from medicalgpt.errors import UsageError

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


def retokenizable_texts(tokenizer, prompts):
    """(texts, how many differ): texts that `tokenizer(texts)` turns back into exactly the token ids `prompts`, and
    how many prompts still come back different. trl 1.16's GRPO and RLOO trainers encode text prompts that way,
    special tokens added (GRPOTrainer._tokenize_prompts, read there): a prompt decoded with the BOS the tokenizer adds
    itself would get two. The BOS is left out of the text, so the policy sees the ids SFT and inference give."""
    adds_bos = bool(leading_bos(tokenizer, ""))
    texts = [tokenizer.decode(ids[1:] if adds_bos and ids[:1] == [tokenizer.bos_token_id] else ids) for ids in prompts]
    again = tokenizer(texts)["input_ids"] if texts else []
    return texts, sum(list(new) != list(ids) for new, ids in zip(again, prompts))


def encode_texts(tokenizer, texts, add_special_tokens=False):
    """Token ids of each of `texts`, the same as `tokenizer(texts, add_special_tokens=...)["input_ids"]`, faster for
    a plain fast tokenizer (see plain_backend): ~30% less time when tokenising a corpus."""
    texts, backend = list(texts), plain_backend(tokenizer)
    if not texts:  # the ordinary call fails on an empty batch
        return []
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def plain_backend(tokenizer):
    """The Rust tokenizer behind `tokenizer` when calling it directly gives the ids transformers would, else None.

    transformers 5.23's TokenizersBackend._encode_plus (read there) sets truncation, padding and split_special_tokens
    on the backend, calls its `encode_batch` and converts each encoding, offsets included. With none of those set and
    the encoding methods not overridden, the backend's `encode_batch_fast` (tokenizers >= 0.20: no offsets) gives
    the same ids; tests/templates/test_encode_texts.py and the real-model tier check it."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    plain = (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(tokenizer.split_special_tokens)
    )
    return backend if plain else None
