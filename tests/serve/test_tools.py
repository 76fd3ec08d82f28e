"""Tool calls over the OpenAI API: the official openai client round-trips a call with a model that learned to make it.

The adapter is trained by supervised_finetuning.py on tool-calling SFT records (ShareGPT with `tools`), so what the
server renders from an OpenAI request must be what SFT rendered, or the learned calls would not come back.
"""

import json
import subprocess
import sys

import httpx
import pytest

from medicalgpt.serve.chat import ChatArguments, ChatPrompt, GenerationOptions, load_chat_engine
from medicalgpt.serve.server import build_app
from medicalgpt.serve.tool_calls import answer_prefix, parse_tool_calls, role_messages, tool_call_events
from tests.helpers import ENV, FAST_FLAGS, REPO, free_port, serving, wait_for_http, write_jsonl

openai = pytest.importorskip("openai")
MODEL = "tool-sft"

DRUGS = {"name": "lookup_drug_interaction", "description": "查询药物相互作用",
         "parameters": {"type": "object", "properties": {"drugs": {"type": "array", "items": {"type": "string"}}},
                        "required": ["drugs"]}}  # fmt: skip
NUMBER = {"type": "number"}
BMI = {"name": "calculate_bmi", "description": "计算BMI",
       "parameters": {"type": "object", "properties": {"height_cm": NUMBER, "weight_kg": NUMBER},
                      "required": ["height_cm", "weight_kg"]}}  # fmt: skip
TOOLS = [{"type": "function", "function": DRUGS}, {"type": "function", "function": BMI}]
Q_DRUGS, Q_BMI, Q_COLD = "我在吃华法林，能吃布洛芬吗？", "身高165体重72，BMI多少？", "感冒了怎么办？"
DRUGS_ARGS, BMI_ARGS = {"drugs": ["华法林", "布洛芬"]}, {"height_cm": 165, "weight_kg": 72}
DRUGS_RESULT, BMI_RESULT = '{"severity": "major"}', '{"bmi": 26.4}'
DRUGS_ANSWER, BMI_ANSWER, NO_TOOLS_ANSWER, COLD_ANSWER = "不建议合用。", "您的BMI是26.4。", "请咨询医生。", "多休息。"


def sharegpt(turns, tools=None):
    record = {"conversations": [{"from": role, "value": value} for role, value in turns]}
    return {**record, "tools": json.dumps(tools, ensure_ascii=False)} if tools else record


def call(name, arguments):
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


TRAINING = [  # a call, its result, the answer; the same question without tools; a question that needs no tool
    sharegpt([("human", Q_DRUGS), ("function_call", call(DRUGS["name"], DRUGS_ARGS)),
              ("observation", DRUGS_RESULT), ("gpt", DRUGS_ANSWER)], [DRUGS, BMI]),
    sharegpt([("human", Q_BMI), ("function_call", call(BMI["name"], BMI_ARGS)),
              ("observation", BMI_RESULT), ("gpt", BMI_ANSWER)], [DRUGS, BMI]),
    sharegpt([("human", Q_DRUGS), ("gpt", NO_TOOLS_ANSWER)]),
    sharegpt([("human", Q_COLD), ("gpt", COLD_ANSWER)], [DRUGS, BMI]),
]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model that learned TRAINING by heart (SFT through the real entry point)."""
    import supervised_finetuning

    root = tmp_path_factory.mktemp("tool-sft")
    data, out = write_jsonl(root / "tools.jsonl", TRAINING), root / MODEL
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data), "--do_train"]
    argv += ["--template_name", "qwen", "--use_peft", "True", "--lora_rank", "16", "--lora_alpha", "32"]
    argv += ["--lora_dropout", "0", "--num_train_epochs", "100", "--learning_rate", "1e-2"]
    argv += ["--per_device_train_batch_size", "4", "--save_strategy", "no", "--output_dir", str(out)]
    supervised_finetuning.main([*argv, *FAST_FLAGS])
    return str(out)


@pytest.fixture(scope="module")
def engine(adapter, tiny_model_dir):
    return load_chat_engine(ChatArguments(base_model=tiny_model_dir, lora_model=adapter, template_name="qwen"))


@pytest.fixture(scope="module")
def server(engine):
    with serving(build_app(engine, MODEL, defaults=GenerationOptions(temperature=0, max_new_tokens=60))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(question):
    return [{"role": "user", "content": question}]


def test_openai_client_round_trips_a_tool_call(client):
    messages = ask(Q_DRUGS)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == DRUGS["name"] and json.loads(tool_call.function.arguments) == DRUGS_ARGS

    messages += [choice.message, {"role": "tool", "tool_call_id": tool_call.id, "content": DRUGS_RESULT}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0)
    assert second.choices[0].message.content == DRUGS_ANSWER and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls


def test_fastapi_server_demo_command_serves_tool_calls(adapter, tiny_model_dir):
    port = free_port()
    command = [sys.executable, "fastapi_server_demo.py", "--base_model", tiny_model_dir, "--lora_model", adapter,
               "--template_name", "qwen", "--port", str(port), "--temperature", "0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=MODEL, messages=ask(Q_BMI), tools=TOOLS)
        (tool_call,) = reply.choices[0].message.tool_calls
        assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == (BMI["name"], BMI_ARGS)
        messages = [*ask(Q_BMI), reply.choices[0].message, {"role": "tool", "tool_call_id": tool_call.id,
                                                             "content": BMI_RESULT}]  # fmt: skip
        answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        assert answer.choices[0].message.content == BMI_ANSWER
    finally:
        process.terminate()
        process.wait(30)


def test_the_request_renders_as_sft_rendered_the_training_record(engine, client):
    from medicalgpt.processors.sft import tokenize_conversation

    reply = client.chat.completions.create(model=MODEL, messages=ask(Q_BMI), tools=TOOLS, temperature=0)
    trained = tokenize_conversation(
        {"messages": [*ask(Q_BMI), {"role": "function_call", "content": call(BMI["name"], BMI_ARGS)}],
         "tools": json.dumps([DRUGS, BMI], ensure_ascii=False)}, engine.template, engine.tokenizer)  # fmt: skip
    prompt = engine.encode(ChatPrompt(ask(Q_BMI), [DRUGS, BMI]))
    assert trained["input_ids"][: len(prompt)] == prompt and reply.usage.prompt_tokens == len(prompt)
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == BMI_ARGS


def test_tool_choice_none_hides_the_tools_and_auto_may_answer_in_text(engine, client):
    hidden = client.chat.completions.create(model=MODEL, messages=ask(Q_DRUGS), tools=TOOLS, tool_choice="none",
                                            temperature=0)  # fmt: skip
    assert hidden.choices[0].message.content == NO_TOOLS_ANSWER and not hidden.choices[0].message.tool_calls
    assert hidden.usage.prompt_tokens == len(engine.encode(ask(Q_DRUGS)))
    text = client.chat.completions.create(model=MODEL, messages=ask(Q_COLD), tools=TOOLS, temperature=0)
    assert text.choices[0].message.content == COLD_ANSWER and text.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": BMI["name"]}}])
def test_required_and_named_tool_choice_start_the_answer_with_the_call(engine, client, tool_choice):
    reply = client.chat.completions.create(model=MODEL, messages=ask(Q_BMI), tools=TOOLS, tool_choice=tool_choice,
                                           temperature=0)  # fmt: skip
    (tool_call,) = reply.choices[0].message.tool_calls
    assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == (BMI["name"], BMI_ARGS)
    prefix = answer_prefix(tool_choice)
    assert reply.usage.prompt_tokens == len(engine.encode(ChatPrompt(ask(Q_BMI), [DRUGS, BMI], prefix)))


def test_streamed_tool_call_arrives_as_one_tool_calls_delta(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(Q_DRUGS), tools=TOOLS, temperature=0,
                                                 stream=True))  # fmt: skip
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert not "".join(delta.content or "" for delta in deltas)
    (tool_call,) = [call for delta in deltas for call in delta.tool_calls or []]
    assert tool_call.index == 0 and tool_call.function.name == DRUGS["name"]
    assert json.loads(tool_call.function.arguments) == DRUGS_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    text = client.chat.completions.create(model=MODEL, messages=ask(Q_COLD), tools=TOOLS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in text if c.choices) == COLD_ANSWER


@pytest.mark.parametrize(
    "body, message",
    [({"tool_choice": "required"}, "tool_choice needs tools"),
     ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "no tool named 'x'"),
     ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
     ({"messages": [*ask(Q_DRUGS), {"role": "assistant", "tool_calls": [
         {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
         {"role": "tool", "content": "r"}]}, "arguments of 'f' are not JSON"),
     ({"messages": [{"role": "tool"}]}, "content is required")],
)  # fmt: skip
def test_bad_tool_requests_are_400_with_the_reason(server, body, message):
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": ask(Q_DRUGS), **body}, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_parse_tool_calls_reads_every_block_and_leaves_bad_json_as_text():
    text = '先查一下。<tool_call>\n{"name": "f", "arguments": {"a": ["华法林"]}}\n</tool_call>\n' + \
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'  # fmt: skip
    content, calls = parse_tool_calls(text)
    assert content == "先查一下。"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"a": ["华法林"]}'),
        ("g", "{}"),
    ]
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("<tool_call>\n{not json\n</tool_call>") == ("<tool_call>\n{not json\n</tool_call>", [])
    assert parse_tool_calls("no call") == ("no call", [])


def test_streamed_text_before_a_call_is_sent_and_a_possible_call_start_held_back():
    pieces = ["先查", "一下。<tool", '_call>\n{"name": "f", "arguments": {}}', "\n</tool_call>"]
    events = list(tool_call_events(pieces))
    assert events[:2] == [("content", "先查"), ("content", "一下。")]
    assert events[2][0] == "tool_calls" and events[2][1][0]["function"] == {"name": "f", "arguments": "{}"}
    assert list(tool_call_events(["a <tool", "x"])) == [("content", "a "), ("content", "<toolx")]


def test_parallel_calls_and_their_results_render_as_qwen2_5s_official_template_renders_them(tiny_tokenizer):
    from pathlib import Path

    import trl

    from medicalgpt.templates import build_template

    calls = [{"function": {"name": "f", "arguments": '{"x": 1}'}}, {"function": {"name": "g", "arguments": ""}}]
    messages = [*ask("q"), {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]  # fmt: skip
    converted = role_messages(messages)
    both = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    results = "A\n</tool_response>\n<tool_response>\nB"
    assert converted[1:] == [{"role": "function_call", "content": both}, {"role": "observation", "content": results}]
    tools = [DRUGS, BMI]
    ours = "".join(p + r for p, r in build_template("qwen", tiny_tokenizer).render_turns(converted, None, tools))
    hf_calls = [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                {"type": "function", "function": {"name": "g", "arguments": {}}}]  # fmt: skip
    hf_messages = [*ask("q"), {"role": "assistant", "content": "", "tool_calls": hf_calls},
                   {"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]  # fmt: skip
    jinja = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    official = tiny_tokenizer.apply_chat_template(hf_messages, tools=tools, chat_template=jinja,
                                                  add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert ours == official
