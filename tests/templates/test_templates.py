"""template.py: built-in templates against the official chat templates shipped with trl, and the role API."""

import dataclasses
import json
from importlib import resources

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from medicalgpt.templates import (
    ConversationTemplate,
    conv_templates,
    get_conv_template,
    register_conv_template,
    template_from_tokenizer,
)

BOS = "<|begin_of_text|>"
BUILTIN = sorted(conv_templates)
NASTY = [
    "plain text",
    "{",
    "}",
    "100% sure, %s %(x)s %d",
    "{content}",
    "{{x}} {0} {% if %}",
    "line one\nline two\n\n",
    "你好，医生。我最近总是头疼，怎么办？",
    "  leading and trailing spaces  ",
    "\nstarts with a newline",
]
SYSTEMS = [None, "", "You are a doctor. {content} 100% {{sys}}\nBe brief."]
# name -> (number of user turns, ends with an assistant answer)
SHAPES = {
    "single": (1, True),
    "single_generation": (1, False),
    "multi": (3, True),
    "multi_generation": (3, False),
}
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city {city}.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市"}},
                "required": ["city"],
            },
        },
    }
]


def official(jinja_name, messages, add_generation_prompt=False, tools=None, **kwargs):
    """Render messages with a chat template from trl, exactly as transformers' apply_chat_template does."""
    chat_template = (resources.files("trl") / "chat_templates" / f"{jinja_name}.jinja").read_text(encoding="utf-8")
    rendered, _ = render_jinja_template(
        [messages], tools=tools, chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return rendered[0]


def conversation(content, turns, complete):
    """User and assistant messages with `content`, ending with an answer when `complete`."""
    messages = []
    for turn in range(turns):
        plain = turn % 2 == 0  # the first and the last turn (of 1 or 3) use `content` as it is
        messages.append({"role": "user", "content": content if plain else f"Question {turn}: {content}"})
        messages.append({"role": "assistant", "content": content if plain else f"Answer {turn}: {content}"})
    return messages if complete else messages[:-1]


def with_system(messages, system, empty_system_is_a_message):
    """The official messages for our system_prompt argument (None: no system message)."""
    if system is None or (system == "" and not empty_system_is_a_message):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def tool_conversation(arguments_as_string=False):
    """user -> function_call -> observation -> assistant, as our role messages and as official messages."""
    arguments = {"city": "北京", "days": 2}
    call_arguments = json.dumps(arguments, ensure_ascii=False) if arguments_as_string else arguments
    ours = [
        {"role": "user", "content": "What's the weather in 北京 {city}?"},
        {"role": "function_call", "content": json.dumps({"name": "get_weather", "arguments": call_arguments})},
        {"role": "observation", "content": '{"temperature": 20, "unit": "°C"}'},
        {"role": "assistant", "content": "It is 20°C in 北京. {content}"},
    ]
    tool_call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    theirs = [
        ours[0],
        {"role": "assistant", "content": "", "tool_calls": [tool_call]},
        {"role": "tool", "content": ours[2]["content"]},
        ours[3],
    ]
    return ours, theirs


# ---------------------------------------------------------------------------------------------------------------------
# Exact match with the official templates
# ---------------------------------------------------------------------------------------------------------------------

OFFICIAL = {
    # our name: (trl jinja, extra render kwargs, an empty system prompt is rendered as an empty system message)
    "qwen": ("qwen2_5", {}, True),
    "llama3": ("llama3", {"bos_token": BOS}, False),
    "qwen3": ("qwen3", {}, False),
    "qwen3_nothink": ("qwen3", {"enable_thinking": False}, False),
}


def expected_official(name, messages, system, complete, tools=None):
    jinja_name, kwargs, empty_system_is_a_message = OFFICIAL[name]
    official_messages = with_system(messages, system, empty_system_is_a_message)
    text = official(jinja_name, official_messages, add_generation_prompt=not complete, tools=tools, **kwargs)
    if name == "llama3":  # our llama3 leaves BOS to the tokenizer
        assert text.startswith(BOS)
        text = text[len(BOS) :]
    return text


@pytest.mark.parametrize("content", NASTY)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("name", OFFICIAL)
def test_matches_official_template(name, system, shape, content):
    turns, complete = SHAPES[shape]
    messages = conversation(content, turns, complete)
    assert get_conv_template(name).render(messages, system_prompt=system) == expected_official(
        name, messages, system, complete
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", OFFICIAL)
def test_get_prompt_matches_official_template(name, shape):
    turns, complete = SHAPES[shape]
    messages = conversation("{content} 100%", turns, complete)
    pairs = [
        [messages[i]["content"], messages[i + 1]["content"] if i + 1 < len(messages) else ""]
        for i in range(0, len(messages), 2)
    ]
    assert get_conv_template(name).get_prompt(pairs) == expected_official(name, messages, None, complete)


def test_qwen_default_system_prompt_is_official():
    qwen = get_conv_template("qwen")
    assert qwen.default_system_prompt == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert qwen.get_prompt([["hi", ""]], system_prompt="") == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arguments_as_string", [False, True])
@pytest.mark.parametrize("ending", ["complete", "observation", "function_call"])
@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("name", ["qwen", "qwen3", "qwen3_nothink"])
def test_tool_calls_match_official_template(name, system, ending, arguments_as_string):
    ours, theirs = tool_conversation(arguments_as_string)
    keep = {"complete": 4, "observation": 3, "function_call": 2}[ending]
    ours, theirs = ours[:keep], theirs[:keep]
    complete = ending != "observation"
    rendered = get_conv_template(name).render(ours, system_prompt=system, tools=json.dumps(WEATHER_TOOLS))
    assert rendered == expected_official(name, theirs, system, complete, tools=WEATHER_TOOLS)


def test_qwen_tool_turns():
    ours, _ = tool_conversation()
    turns = get_conv_template("qwen").render_turns(ours, system_prompt="SYS", tools=json.dumps(WEATHER_TOOLS))
    assert [response for _, response in turns] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}\n</tool_call><|im_end|>',
        "It is 20°C in 北京. {content}<|im_end|>",
    ]
    assert turns[1][0] == (
        '\n<|im_start|>user\n<tool_response>\n{"temperature": 20, "unit": "°C"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_qwen_parallel_tool_calls_match_official_template():
    calls = [{"name": "get_weather", "arguments": {"city": city}} for city in ("北京", "Paris")]
    ours = [{"role": "user", "content": "Weather?"}, {"role": "function_call", "content": json.dumps(calls)}]
    theirs = [ours[0], {"role": "assistant", "content": "", "tool_calls": [{"function": call} for call in calls]}]
    rendered = get_conv_template("qwen").render(ours, tools=WEATHER_TOOLS)
    assert rendered == expected_official("qwen", theirs, None, True, tools=WEATHER_TOOLS)


def test_qwen3_reasoning_turns():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nreason 1\n</think>\n\nanswer 1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nreason 2\n</think>\n\nanswer 2"},
    ]
    turns = get_conv_template("qwen3").render_turns(messages)
    assert turns[0][1] == "answer 1<|im_end|>"  # earlier reasoning is dropped, as the official template does
    assert turns[1][1] == "<think>\nreason 2\n</think>\n\nanswer 2<|im_end|>"


def _message(role, content):
    return {"role": role, "content": content}


QWEN3_REASONING = {
    "two_turns": [
        _message("user", "q1"),
        _message("assistant", "<think>\nreason 1\n</think>\n\nanswer 1"),
        _message("user", "q2"),
        _message("assistant", "<think>reason 2</think>answer 2"),
    ],
    "reasoning_after_last_query": [
        _message("user", "q"),
        _message("assistant", "<think>\nlook it up\n</think>\n\nlooking"),
        _message("observation", "result"),
        _message("assistant", "\n\nfinal"),
    ],
    "no_user_query": [_message("observation", "result"), _message("assistant", "done")],
    "answer_without_reasoning_after_tool": [
        _message("user", "q"),
        _message("assistant", "plain"),
        _message("observation", "result"),
    ],
}


@pytest.mark.parametrize("name", ["qwen3", "qwen3_nothink"])
@pytest.mark.parametrize("case", QWEN3_REASONING)
def test_qwen3_reasoning_matches_official_template(case, name):
    messages = QWEN3_REASONING[case]
    official_messages = [{**m, "role": "tool"} if m["role"] == "observation" else m for m in messages]
    complete = messages[-1]["role"] == "assistant"
    expected = expected_official(name, official_messages, None, complete)
    assert get_conv_template(name).render(messages) == expected


def test_qwen3_nothink_keeps_reasoning_of_the_last_answer():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"}]
    nothink = get_conv_template("qwen3_nothink")
    assert nothink.render(messages) == expected_official("qwen3_nothink", messages, None, True)
    assert nothink.render_turns(messages) == [
        ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "<think>\nhmm\n</think>\n\nanswer<|im_end|>")
    ]
    plain = [messages[0], {"role": "assistant", "content": "answer"}]  # no reasoning: the empty block is prompt
    assert nothink.render_turns(plain) == [
        ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", "answer<|im_end|>")
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Other templates: their known formats, written out by hand
# ---------------------------------------------------------------------------------------------------------------------

TWO_TURNS = [["q1", "a1"], ["q2", "a2"]]
LITERALS = {
    "vicuna": (
        None,
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>",
    ),
    "alpaca": (
        None,
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nq1\n\n### Response:\na1</s>\n\n### Instruction:\nq2\n\n### Response:\na2</s>",
    ),
    "base": (None, "q1a1</s>q2a2</s>"),
    "chatml": (
        None,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    ),
    # SmolLM2-Instruct: ChatML with its default system prompt (checked against the model's own template in
    # tests/quickstart/test_real_model.py).
    "smollm2": (
        None,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    ),
    "yi": (
        None,
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    ),
    "intern2": (
        None,
        "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>\n"
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    ),
    "llama2": ("SYS", "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq1 [/INST] a1</s><s>[INST] q2 [/INST] a2</s>"),
    "mistral": (None, "[INST] q1 [/INST]a1</s>[INST] q2 [/INST]a2</s>"),
    "deepseek": (None, "User: q1\n\nAssistant: a1<｜end▁of▁sentence｜>User: q2\n\nAssistant: a2<｜end▁of▁sentence｜>"),
    "baichuan": (None, "<reserved_102>q1<reserved_103>a1</s><reserved_102>q2<reserved_103>a2</s>"),
    "baichuan2": (None, "<reserved_106>q1<reserved_107>a1</s><reserved_106>q2<reserved_107>a2</s>"),
    "chatglm3": ("SYS", "<|system|>\nSYS<|user|>\nq1<|assistant|>\na1<|user|>\nq2<|assistant|>\na2<|user|>"),
}


@pytest.mark.parametrize("name", LITERALS)
def test_known_format(name):
    system, expected = LITERALS[name]
    assert get_conv_template(name).get_prompt(TWO_TURNS, system_prompt=system) == expected


def test_llama2_default_system_prompt():
    prompt = get_conv_template("llama2").get_prompt([["q", ""]])
    assert prompt.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer")
    assert prompt.endswith("please don't share false information.\n<</SYS>>\n\nq [/INST] ")


def test_mistral_system_prompt_opens_first_user_turn():
    assert get_conv_template("mistral").get_prompt(TWO_TURNS, "SYS") == (
        "[INST] SYS\n\nq1 [/INST]a1</s>[INST] q2 [/INST]a2</s>"
    )


def test_every_builtin_template_has_a_test():
    assert set(BUILTIN) == set(OFFICIAL) | set(LITERALS)


# ---------------------------------------------------------------------------------------------------------------------
# Properties of every template
# ---------------------------------------------------------------------------------------------------------------------


def mixed_conversation(content):
    ours, _ = tool_conversation()
    return [*conversation(content, 2, True), *ours]


@pytest.mark.parametrize("generation", [False, True])
@pytest.mark.parametrize("name", BUILTIN)
def test_turns_concatenate_to_the_rendering(name, generation):
    template = get_conv_template(name)
    messages = mixed_conversation("{content} %s")
    if generation:
        messages = messages[:-1]
    turns = template.render_turns(messages, system_prompt="S {x}", tools=WEATHER_TOOLS)
    assert len(turns) == (len(messages) + 1) // 2
    text = "".join(prompt + response for prompt, response in turns)
    expected = template.render(messages, system_prompt="S {x}", tools=WEATHER_TOOLS)
    assert text + ("" if generation else template.closing_suffix) == expected
    responses = [response for _, response in turns]
    if generation:
        assert responses.pop() == ""
    assert all(response.endswith(template.stop_str) for response in responses)


@pytest.mark.parametrize("name", BUILTIN)
def test_dialog_concatenates_to_get_prompt(name):
    template = get_conv_template(name)
    for pairs in (TWO_TURNS, [["q1", "a1"], ["q2", ""]], [["q", None]]):
        dialog = template.get_dialog(pairs, system_prompt="S")
        prompt = template.get_prompt(pairs, system_prompt="S")
        assert len(dialog) == 2 * len(pairs)
        assert "".join(dialog) == prompt.removesuffix(template.closing_suffix) if pairs[-1][1] else prompt
    assert dialog[-1] == ""


@pytest.mark.parametrize("name", BUILTIN)
def test_responses_are_answer_and_stop_str(name):
    template = get_conv_template(name)
    turns = template.render_turns(conversation("an answer {x}", 3, True))
    answers = ["an answer {x}", "Answer 1: an answer {x}", "an answer {x}"]
    if name == "qwen3":  # thinking mode: the last answer has the think block
        answers[-1] = "<think>\n\n</think>\n\n" + answers[-1]
    assert [response for _, response in turns] == [answer + template.stop_str for answer in answers]


@pytest.mark.parametrize("content", NASTY)
@pytest.mark.parametrize("name", BUILTIN)
def test_contents_are_verbatim(name, content):
    template = get_conv_template(name)
    system = "sys " + content
    text = template.render(conversation(content, 2, True), system_prompt=system)
    clean = content.strip() if template.strip_content else content
    if name in ("qwen3", "qwen3_nothink") and content.startswith("\n"):  # Qwen3 strips the last answer's "\n"s
        clean = content.lstrip("\n")
    assert clean in text
    assert (system.strip() if template.strip_content else system) in text


@pytest.mark.parametrize("name", BUILTIN)
def test_empty_system_prompt_renders_no_system_block(name):
    template = get_conv_template(name)
    without_default = dataclasses.replace(template, default_system_prompt="")
    if template.keep_empty_system:
        assert template.get_prompt(TWO_TURNS, "") != without_default.get_prompt(TWO_TURNS, "q0")
        return
    assert template.get_prompt(TWO_TURNS, system_prompt="") == without_default.get_prompt(TWO_TURNS)
    assert (
        template.get_prompt(TWO_TURNS, system_prompt="") == template.get_prompt(TWO_TURNS, system_prompt="").lstrip()
    )


@pytest.mark.parametrize("name", BUILTIN)
def test_generic_tool_format(name):
    template = get_conv_template(name)
    ours, _ = tool_conversation()
    text = template.render(ours, tools=WEATHER_TOOLS)
    assert "# Tools" in text and json.dumps(WEATHER_TOOLS[0], ensure_ascii=False) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 20, "unit": "°C"}\n</tool_response>' in text


def test_attributes():
    for name in BUILTIN:
        template = get_conv_template(name)
        assert template.name == name
        assert template.stop_str
        assert isinstance(template.default_system_prompt, str)
    assert get_conv_template("llama3").stop_str == "<|eot_id|>"
    assert get_conv_template("qwen").stop_str == "<|im_end|>"
    assert get_conv_template("qwen").closing_suffix == "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Errors and the registry
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
        [{"role": "user", "content": "q"}, {"role": "observation", "content": "r"}],
        [{"role": "function_call", "content": "{}"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "a"},
        ],
    ],
)
def test_bad_role_order_raises(messages):
    with pytest.raises(ValueError):
        get_conv_template("qwen").render_turns(messages)


@pytest.mark.parametrize("content", ["not json", '{"arguments": {}}', "[1, 2]"])
def test_bad_function_call_raises(content):
    messages = [{"role": "user", "content": "q"}, {"role": "function_call", "content": content}]
    with pytest.raises(ValueError, match="function_call content"):
        get_conv_template("qwen").render_turns(messages)


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError) as error:
        get_conv_template("no-such-template")
    assert ", ".join(sorted(conv_templates)) in str(error.value)
    assert "no-such-template" in str(error.value)


def test_register_conv_template():
    template = ConversationTemplate(name="test-human-bot", user_format="Human: {content}\nBot: ", stop_str="<end>")
    try:
        register_conv_template(template)
        assert (
            get_conv_template("test-human-bot").get_prompt([["hi {x}", "hello"]]) == "Human: hi {x}\nBot: hello<end>"
        )
        with pytest.raises(ValueError, match="already registered"):
            register_conv_template(dataclasses.replace(template, stop_str="<stop>"))
        register_conv_template(dataclasses.replace(template, stop_str="<stop>"), override=True)
        assert get_conv_template("test-human-bot").stop_str == "<stop>"
    finally:
        conv_templates.pop("test-human-bot", None)


def test_format_needs_one_placeholder():
    with pytest.raises(ValueError, match="exactly once"):
        ConversationTemplate(name="bad", user_format="User: {query}", stop_str="</s>")


# ---------------------------------------------------------------------------------------------------------------------
# template_from_tokenizer
# ---------------------------------------------------------------------------------------------------------------------


class FakeTokenizer:
    """Just enough of a tokenizer: renders a trl chat template like apply_chat_template(tokenize=False)."""

    def __init__(self, jinja_name=None, chat_template=None, eos_token="<|endoftext|>", bos_token=""):
        if jinja_name:
            path = resources.files("trl") / "chat_templates" / f"{jinja_name}.jinja"
            chat_template = path.read_text(encoding="utf-8")
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.bos_token = bos_token

    def apply_chat_template(self, conversation, tools=None, add_generation_prompt=False, tokenize=True, **kwargs):
        assert tokenize is False
        rendered, _ = render_jinja_template(
            [conversation],
            tools=tools,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )
        return rendered[0]


@pytest.mark.parametrize("content", NASTY[:5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("system", SYSTEMS)
def test_tokenizer_template_matches_qwen(system, shape, content):
    from_tokenizer = template_from_tokenizer(FakeTokenizer("qwen2_5"))
    messages = conversation(content, *SHAPES[shape])
    expected = get_conv_template("qwen").render_turns(messages, system_prompt=system)
    assert from_tokenizer.render_turns(messages, system_prompt=system) == expected


@pytest.mark.parametrize("ending", [2, 3, 4])
def test_tokenizer_template_matches_qwen_with_tools(ending):
    from_tokenizer = template_from_tokenizer(FakeTokenizer("qwen2_5"))
    ours, _ = tool_conversation()
    tools = json.dumps(WEATHER_TOOLS)
    expected = get_conv_template("qwen").render_turns(ours[:ending], system_prompt="SYS", tools=tools)
    assert from_tokenizer.render_turns(ours[:ending], system_prompt="SYS", tools=tools) == expected


def test_tokenizer_template_attributes_and_pair_api():
    from_tokenizer = template_from_tokenizer(FakeTokenizer("qwen2_5"))
    qwen = get_conv_template("qwen")
    assert from_tokenizer.stop_str == "<|im_end|>"
    assert from_tokenizer.closing_suffix == "\n"
    for pairs in (TWO_TURNS, [["q1", "a1"], ["q2", ""]]):
        assert from_tokenizer.get_prompt(pairs) == qwen.get_prompt(pairs)
        assert from_tokenizer.get_dialog(pairs) == qwen.get_dialog(pairs)


def test_tokenizer_template_llama3_keeps_bos():
    from_tokenizer = template_from_tokenizer(FakeTokenizer("llama3", eos_token="<|eot_id|>", bos_token=BOS))
    messages = conversation("  hello {x}  ", 2, True)
    turns = get_conv_template("llama3").render_turns(messages, system_prompt="SYS")
    turns[0] = (BOS + turns[0][0], turns[0][1])
    assert from_tokenizer.render_turns(messages, system_prompt="SYS") == turns
    assert from_tokenizer.stop_str == "<|eot_id|>"


def test_tokenizer_template_qwen3_single_turn_and_kwargs():
    messages = conversation("hi", 1, True)
    thinking = template_from_tokenizer(FakeTokenizer("qwen3"))
    assert thinking.render_turns(messages) == get_conv_template("qwen3").render_turns(messages)
    nothink = template_from_tokenizer(FakeTokenizer("qwen3"), chat_template_kwargs={"enable_thinking": False})
    assert nothink.render_turns(messages[:1]) == get_conv_template("qwen3_nothink").render_turns(messages[:1])


def test_tokenizer_template_not_prefix_consistent_raises():
    # Qwen3's template gives the last answer a think block, and drops it once another turn follows.
    from_tokenizer = template_from_tokenizer(FakeTokenizer("qwen3"))
    with pytest.raises(ValueError, match="prefix-consistent"):
        from_tokenizer.render_turns(conversation("hi", 2, True))


def test_tokenizer_without_chat_template_raises():
    with pytest.raises(ValueError, match="no chat template"):
        template_from_tokenizer(FakeTokenizer(chat_template=None))


def test_tokenizer_template_without_tool_support_raises():
    chat_template = (
        "{% for m in messages %}{% if m.role in ['user', 'assistant'] %}<{{ m.role }}>{{ m.content }}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    from_tokenizer = template_from_tokenizer(FakeTokenizer(chat_template=chat_template, eos_token="</s>"))
    assert from_tokenizer.stop_str == "</s>"
    assert from_tokenizer.render_turns(conversation("x", 1, True)) == [("<user>x</s><assistant>", "x</s>")]
    ours, _ = tool_conversation()
    with pytest.raises(ValueError, match="tool calls"):
        from_tokenizer.render_turns(ours[:2])
    with pytest.raises(ValueError, match="tool results"):
        from_tokenizer.render_turns([ours[0], {"role": "assistant", "content": "a"}, ours[2]])
    with pytest.raises(ValueError, match="render tools"):
        from_tokenizer.render_turns(ours[:1], tools=WEATHER_TOOLS)
