"""The generation worker (medicalgpt/serve/scheduler.py) survives anything a request does, and interleaves them."""

import asyncio
import time

import pytest
import torch

from medicalgpt.serve import scheduler as scheduling
from medicalgpt.serve.chat import GenerationOptions
from medicalgpt.serve.decoding import Decoding
from medicalgpt.serve.scheduler import Cancelled, GenerationFailed, Scheduler, ServerBusy, ShuttingDown, TimedOut
from tests.helpers import QA_PAIRS, qa_engine, user, wait_until

GREEDY = GenerationOptions(temperature=0, max_new_tokens=30)
ENDLESS = GenerationOptions(temperature=1.0, top_p=1.0, max_new_tokens=3000)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir):
    return qa_engine(tmp_path_factory, tiny_model_dir)


def result(ticket):
    return asyncio.run(ticket.result())


def test_stepwise_decoding_gives_model_generate_s_answers_batched_and_alone(engine):
    questions = [user(question) for question, _ in QA_PAIRS]
    reference = engine.generate(questions, GREEDY)
    batched = Decoding(engine, [engine.encode(q) for q in questions], GREEDY, prefill_chunk=3)
    pieces = [[] for _ in questions]
    while not batched.finished:
        for row, piece in batched.step():
            pieces[row].append(piece)
    for row, (_, answer) in enumerate(QA_PAIRS):
        completion = batched.completion(row)
        assert completion == reference[row] and completion.text == answer == "".join(pieces[row])
        assert len(pieces[row]) > 1


def test_a_short_request_finishes_while_a_long_one_is_in_flight(endless_engine):
    scheduler = Scheduler(endless_engine, max_batch_size=1)
    try:
        long = scheduler.submit(endless_engine.encode(user("long")), ENDLESS)
        wait_until(lambda: long.backlog > 0)
        short = scheduler.submit(endless_engine.encode(user("short")), GenerationOptions(max_new_tokens=5))
        started = scheduler.steps
        completion = result(short)
        assert completion.completion_tokens == 5 and completion.finish_reason == "length"
        assert not long.done, "the long request is still generating"
        assert scheduler.steps - started <= 2 * 6 + 2, "one step each per turn: prefill + 5 tokens, interleaved"
        long.cancel()
        with pytest.raises(Cancelled):
            result(long)
    finally:
        scheduler.close()


def test_a_cancelled_generation_stops_within_a_step_and_a_cancelled_queued_one_never_starts(endless_engine):
    scheduler = Scheduler(endless_engine)
    try:
        running = scheduler.submit(endless_engine.encode(user("a")), ENDLESS)
        wait_until(lambda: running.backlog > 0)
        with endless_engine._lock:  # the worker waits for its next step: nothing new starts meanwhile
            queued = scheduler.submit(endless_engine.encode(user("b")), GREEDY)
            queued.cancel()
            running.cancel()
            steps = scheduler.steps
        wait_until(lambda: running.done and queued.done)
        assert scheduler.steps - steps <= 1, "a cancelled generation takes at most the step already under way"
        assert isinstance(running.error, Cancelled) and isinstance(queued.error, Cancelled)
        assert queued.completion is None and scheduler.held == 0
        assert result(scheduler.submit(endless_engine.encode(user("c")), GREEDY)).completion_tokens == 30
    finally:
        scheduler.close()


def test_a_batch_mate_that_leaves_does_not_change_the_others_answers(engine):
    scheduler = Scheduler(engine)
    try:
        with engine._lock:  # the worker waits for its first step
            with scheduler._ready:  # the four arrive together: one batch
                tickets = [scheduler.submit(engine.encode(user(question)), GREEDY) for question, _ in QA_PAIRS]
            wait_until(lambda: not scheduler._pending)
            tickets[1].cancel()  # dropped from its batch after the step under way
        with pytest.raises(Cancelled):
            result(tickets[1])
        answers = [result(ticket).text for index, ticket in enumerate(tickets) if index != 1]
        assert answers == [answer for index, (_, answer) in enumerate(QA_PAIRS) if index != 1]
    finally:
        scheduler.close()


def test_a_request_whose_generation_raises_fails_alone_and_the_worker_goes_on(engine, monkeypatch):
    poison = engine.encode(user("poison"))

    class Failing(Decoding):
        def step(self):
            if self.prompt_tokens == [len(poison)] and torch.equal(self.sequences[0, -len(poison) :],
                                                                  torch.tensor(poison)):  # fmt: skip
                raise RuntimeError("bad tensor")
            return super().step()

    monkeypatch.setattr(scheduling, "Decoding", Failing)
    scheduler = Scheduler(engine, max_batch_size=1)
    try:
        bad = scheduler.submit(poison, GREEDY)
        good = [scheduler.submit(engine.encode(user(q)), GREEDY) for q, _ in QA_PAIRS]
        with pytest.raises(GenerationFailed, match="RuntimeError: bad tensor"):
            result(bad)
        assert [result(ticket).text for ticket in good] == [answer for _, answer in QA_PAIRS]
        assert scheduler.alive
    finally:
        scheduler.close()


def test_limits_queue_timeout_and_a_reader_who_stops_reading(endless_engine):
    scheduler = Scheduler(endless_engine, max_queue=2, request_timeout=1.0, buffer_limit=4, stall_timeout=0.5)
    try:
        ids = endless_engine.encode(user("x"))
        short = GenerationOptions(temperature=0, max_new_tokens=3)  # fewer pieces than a reader may leave waiting
        first, second = scheduler.submit(ids, ENDLESS), scheduler.submit(ids, short)
        with pytest.raises(ServerBusy, match="--max_queue 2"):
            scheduler.submit(ids, GREEDY)
        wait_until(lambda: first.done)
        assert isinstance(first.error, Cancelled) and "read nothing" in str(first.error), "nobody read it"
        assert first.backlog == 4, "parked once 4 pieces waited"
        timed = scheduler.submit(ids, ENDLESS)
        pieces = []

        async def read():
            async for piece in timed.pieces():
                pieces.append(piece)

        start = time.monotonic()
        with pytest.raises(TimedOut, match="--request_timeout"):
            asyncio.run(read())
        assert 1.0 <= time.monotonic() - start < 3.0 and len(pieces) > 4
        assert second.done and result(second).completion_tokens == 3 and scheduler.held == 0
    finally:
        scheduler.close()


def test_stop_fails_running_and_queued_requests_and_ends_the_worker(endless_engine):
    scheduler = Scheduler(endless_engine, max_batch_size=1)
    running = scheduler.submit(endless_engine.encode(user("a")), ENDLESS)
    wait_until(lambda: running.backlog > 0)
    with endless_engine._lock:
        queued = scheduler.submit(endless_engine.encode(user("b")), GREEDY)
        scheduler.stop()
    scheduler.thread.join(5)
    assert not scheduler.alive
    for ticket in (running, queued):
        with pytest.raises(ShuttingDown):
            result(ticket)
    with pytest.raises(ShuttingDown):
        scheduler.submit(endless_engine.encode(user("c")), GREEDY)
