"""inference.py and the shared generation engine (medicalgpt/serve/chat.py)."""

import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

from medicalgpt.errors import DataValidationError
from medicalgpt.serve.chat import ChatArguments, GenerationOptions, PromptTooLongError, load_chat_engine
from medicalgpt.serve.options import until_stop
from tests.helpers import ANSWERS, QA_PAIRS, REPO, free_port, qa_adapter, qa_engine, user, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
GREEDY = GenerationOptions(temperature=0, max_new_tokens=30)


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, tiny_model_dir):
    return qa_adapter(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="session")
def engine(tmp_path_factory, tiny_model_dir):
    return qa_engine(tmp_path_factory, tiny_model_dir)


def run(args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout,
                          **kwargs)  # fmt: skip


def test_tutorial_batch_command_after_sft_gives_the_trained_answers_in_input_order(tiny_model_dir, adapter, tmp_path):
    (q1, a1), (q2, a2), (q3, a3), (q4, a4) = QA_PAIRS
    records = [
        {"instruction": q2, "input": "", "id": 7},
        {"question": q4},
        {"prompt": q1},
        {"messages": [{"role": "user", "content": q3}, {"role": "assistant", "content": "reference answer"}]},
        {"conversations": [{"from": "human", "value": q1}]},
    ]
    data, output = write_jsonl(tmp_path / "input.jsonl", records), tmp_path / "output.jsonl"
    tutorial = ["inference.py", "--base_model", tiny_model_dir, "--lora_model", adapter, "--data_file", str(data),
                "--output_file", str(output), "--template_name", "qwen"]  # fmt: skip
    result = run([*tutorial, "--temperature", "0", "--batch_size", "2"])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in row.items() if k != "output"} for row in rows] == records
    assert [row["output"] for row in rows] == [a2, a4, a1, a3, a1]
    assert "Generating" in result.stderr  # the progress bar
    assert not (tmp_path / "output.jsonl.partial").exists()


def test_txt_prompts_and_the_tokenizer_template_by_default(tiny_model_dir, adapter, tmp_path):
    import inference

    data = tmp_path / "questions.txt"
    data.write_text("\n".join(q for q, _ in QA_PAIRS) + "\n\n", encoding="utf-8")
    output = tmp_path / "out" / "answers.jsonl"
    inference.main(["--base_model", tiny_model_dir, "--lora_model", adapter, "--data_file", str(data),
                    "--output_file", str(output), "--temperature", "0", "--batch_size", "8"])  # fmt: skip
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"prompt": q, "output": a} for q, a in QA_PAIRS]


def test_invalid_input_lines_are_reported_with_path_and_line_before_any_model_loads(tmp_path):
    import inference

    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "ok"}\n{"prompt": 3}\n{not json}\n{"text": "no prompt"}\n'
        '{"messages": [{"role": "assistant", "content": "hi"}]}\n'
        '{"conversations": [{"from": "bot", "value": "x"}]}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataValidationError) as caught:
        inference.main(["--base_model", str(tmp_path / "no-such-model"), "--data_file", str(data)])
    message = str(caught.value)
    assert f"{data}:2: error: prompt: expected a non-empty string" in message
    assert f"{data}:3: error: invalid JSON" in message
    assert f"{data}:4: error: record has no prompt" in message
    assert f"{data}:5: error: messages: no user message to answer" in message
    assert f"{data}:6: error: conversations[0].from: unknown role 'bot'" in message
    assert f"{data}:1:" not in message


def test_a_prompt_too_long_for_the_context_is_a_path_line_error(engine, tmp_path):
    import inference
    from medicalgpt.data.prompt_files import load_prompt_records

    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi"}, {"prompt": "发烧 " * 3000}])
    with pytest.raises(DataValidationError, match=f"{data}:2: error: prompt: the prompt"):
        inference.check_prompts(engine, load_prompt_records(str(data)), str(data), max_new_tokens=30)


def test_batched_left_padded_generation_equals_one_at_a_time(engine):
    conversations = [user(q) for q, _ in QA_PAIRS] + [user("头痛"), user("A much longer question " * 5)]
    options = GenerationOptions(temperature=0, max_new_tokens=12)
    batched = engine.generate(conversations, options)
    alone = [engine.generate([c], options)[0] for c in conversations]
    assert batched == alone
    assert [c.text for c in batched[:4]] == [a for _, a in QA_PAIRS]
    first = batched[0]
    answer_tokens = len(engine.tokenizer.encode(QA_PAIRS[0][1], add_special_tokens=False))
    assert (first.finish_reason, first.completion_tokens) == ("stop", answer_tokens + 1)  # + <|im_end|>
    assert first.prompt_tokens == len(engine.encode(conversations[0]))


def test_prompt_tokens_are_those_sft_trained_on(engine, tiny_tokenizer):
    from medicalgpt.processors.sft import tokenize_conversation

    conversation = [*user("q1"), {"role": "assistant", "content": "a1"}, *user("q2")]
    trained = tokenize_conversation({"messages": [*conversation, {"role": "assistant", "content": "a2"}]},
                                    engine.template, tiny_tokenizer)["input_ids"]  # fmt: skip
    assert trained[: len(engine.encode(conversation))] == engine.encode(conversation)
    official = tiny_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert engine.encode(conversation) == tiny_tokenizer.encode(official)


def test_stream_yields_the_answer_piece_by_piece_and_stops(engine):
    question, answer = QA_PAIRS[2]
    stream = engine.stream(user(question), GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert stream.completion.text == answer and stream.completion.finish_reason == "stop"

    cut = engine.stream(user(question), GenerationOptions(temperature=0, max_new_tokens=30, stop=("and",)))
    assert "".join(cut) == "Warm water " and cut.completion.finish_reason == "stop"
    assert engine.generate([user(question)], GenerationOptions(temperature=0, stop=("and",)))[0].text == "Warm water "


def test_leaving_a_stream_early_ends_its_generation_and_frees_the_engine(engine):
    stream = engine.stream(user("随便说点什么"), GenerationOptions(temperature=1.0, max_new_tokens=3000))
    for _ in stream:
        break
    stream._cancel.wait(1)
    assert engine._lock.acquire(timeout=10), "the cancelled generation must release the model"
    engine._lock.release()
    assert engine.generate([user(QA_PAIRS[0][0])], GREEDY)[0].text == QA_PAIRS[0][1]


def test_until_stop_holds_back_a_possible_stop_string():
    assert list(until_stop(["Warm wa", "ter a", "nd rest"], ["and"])) == ["Warm w", "ater ", None]
    assert list(until_stop(["a", "n", "t"], ["and"])) == ["ant"]


def test_concurrent_callers_never_interleave(engine):
    results, errors = {}, []

    def ask(index, question, streaming):
        try:
            if streaming:
                results[index] = "".join(engine.stream(user(question), GREEDY))
            else:
                results[index] = engine.generate([user(question)], GREEDY)[0].text
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    jobs = [(i, QA_PAIRS[i % 4][0], i % 2 == 0) for i in range(8)]
    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert results == {i: ANSWERS[question] for i, question, _ in jobs}


class Recorder:
    """An engine wrapper that records the conversations it is asked to continue."""

    def __init__(self, engine):
        self.engine, self.seen = engine, []

    def stream(self, messages, options):
        self.seen.append([dict(m) for m in messages])
        return self.engine.stream(messages, options)

    def __getattr__(self, name):  # encode, check_length, context_length: the engine's
        return getattr(self.engine, name)


def test_interactive_chat_keeps_every_answer_in_the_history_and_clear_forgets(engine):
    import inference

    (q1, a1), (q2, a2), (q3, a3), _ = QA_PAIRS
    lines = iter([q1, q2, "clear", q3, "exit"])
    recorder, shown = Recorder(engine), []
    inference.chat_loop(recorder, GREEDY, read=lambda prompt: next(lines), write=shown.append)
    assert recorder.seen == [
        user(q1),
        [*user(q1), {"role": "assistant", "content": a1}, *user(q2)],
        user(q3),
    ]
    assert "".join(shown).count("Assistant: ") == 3 and "History cleared." in "".join(shown)
    assert a1 in "".join(shown) and a3 in "".join(shown)
    assert "Warm " in shown and "rest." in shown, "the answer is written piece by piece as it streams"


def test_tutorial_interactive_command_streams_on_the_terminal(tiny_model_dir, adapter):
    (q1, a1), (q2, a2), *_ = QA_PAIRS
    result = run(["inference.py", "--base_model", tiny_model_dir, "--lora_model", adapter, "--interactive",
                  "--temperature", "0"], input=f"{q1}\nclear\n{q2}\nexit\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Assistant: {a1}\n" in result.stdout and f"Assistant: {a2}\n" in result.stdout


def test_too_long_history_forgets_the_oldest_exchange(engine):
    import inference

    long_question = "发烧 " * 1000  # ~3000 tokens of a 4096-token context
    lines = iter([long_question, long_question, long_question * 2, "exit"])
    recorder, shown = Recorder(engine), []
    options = GenerationOptions(temperature=0, max_new_tokens=30)
    inference.chat_loop(recorder, options, read=lambda prompt: next(lines), write=shown.append)
    assert [len(messages) for messages in recorder.seen] == [1, 1]  # the first exchange left out; the third too long
    assert recorder.seen[1] == user(long_question)
    assert "its oldest exchange is left out of what the model sees" in "".join(shown)
    assert "Error: the prompt (" in "".join(shown) and "Shorten the message." in "".join(shown)
    with pytest.raises(PromptTooLongError):
        engine.stream(user(long_question * 2), options)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_use_vllm_without_vllm_says_what_to_install(tmp_path):
    import inference
    from medicalgpt.errors import UsageError

    data = tmp_path / "q.txt"
    data.write_text("hi\n", encoding="utf-8")
    with pytest.raises(UsageError, match="pip install vllm"):
        inference.main(["--base_model", "unused", "--data_file", str(data), "--use_vllm", "True"])


def test_a_full_model_passed_as_lora_model_is_a_clear_error(tiny_model_dir, tmp_path):
    import inference
    from medicalgpt.errors import UsageError

    data = tmp_path / "q.txt"
    data.write_text("hi\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not a LoRA adapter directory"):
        inference.main(["--base_model", tiny_model_dir, "--lora_model", tiny_model_dir, "--data_file", str(data)])


def test_4bit_loading_generates(tiny_model_dir, adapter):
    pytest.importorskip("bitsandbytes")
    engine = load_chat_engine(ChatArguments(base_model=tiny_model_dir, lora_model=adapter, load_in_4bit=True))
    assert any("4bit" in type(module).__name__ for module in engine.model.modules())
    completion = engine.generate([user(QA_PAIRS[0][0])], GenerationOptions(temperature=0, max_new_tokens=5))[0]
    assert completion.completion_tokens >= 1


def test_batch_benchmark_prints_both_figures(tiny_model_dir, capsys):
    from bench import batch_inference

    result = batch_inference.main(["--model", tiny_model_dir, "--num_prompts", "4", "--batch_size", "2",
                                   "--max_new_tokens", "4"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and result["one_at_a_time"]["batch_size"] == 1 and result["batched"]["batch_size"] == 2
    assert result["one_at_a_time"]["tokens"] > 0 and result["speedup"] > 0


def test_torchrun_two_processes_split_the_prompts_and_write_the_one_process_file(tiny_model_dir, adapter, tmp_path):
    import inference

    (q1, a1), (q2, a2), (q3, a3), (q4, a4) = QA_PAIRS
    records = [{"prompt": q3}, {"question": q1, "id": 2}, {"prompt": "头痛"}, {"instruction": q4, "input": ""}]
    records += [{"prompt": q2}, {"messages": [{"role": "user", "content": q1}]}, {"prompt": "A longer question " * 4}]
    data = write_jsonl(tmp_path / "input.jsonl", records)
    flags = ["--base_model", tiny_model_dir, "--lora_model", adapter, "--data_file", str(data)]
    flags += ["--template_name", "qwen", "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "2"]
    single, parallel = tmp_path / "one.jsonl", tmp_path / "two" / "out.jsonl"
    inference.main([*flags, "--output_file", str(single)])

    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    result = run([*launcher, str(free_port()), "inference.py", *flags, "--output_file", str(parallel)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Rank 0 of 2 answers prompts 1-3 of 7" in result.stderr
    assert "Rank 1 of 2 answers prompts 4-7 of 7" in result.stderr
    assert parallel.read_bytes() == single.read_bytes()
    rows = [json.loads(line) for line in parallel.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in row.items() if k != "output"} for row in rows] == records
    assert [rows[i]["output"] for i in (0, 1, 3, 4, 5)] == [a3, a1, a4, a2, a1]
    assert sorted(p.name for p in parallel.parent.iterdir()) == ["out.jsonl"]


def test_shards_are_contiguous_and_cover_the_input_once():
    from medicalgpt.serve.batch_inference import shard

    items = list(range(7))
    assert [shard(items, rank, 3) for rank in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [shard(items[:1], rank, 2) for rank in range(2)] == [[], [0]]


@pytest.mark.parametrize("mode", [["--interactive"], ["--data_file", "q.txt", "--use_vllm", "True"]])
def test_under_torchrun_only_transformers_batch_mode_runs(mode, monkeypatch, tmp_path):
    import inference
    from medicalgpt.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="under torchrun, inference.py answers a --data_file with transformers"):
        inference.main(["--base_model", str(tmp_path / "unused"), *mode])
