"""gradio_demo.py in a real headless browser: Debian's chromium driven by Playwright (no browser download).

Skipped where chromium is not installed (`apt-get install chromium`) or the playwright package is missing.
Set MEDICALGPT_SCREENSHOT=path.png to keep a screenshot of the answered page.
"""

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from medicalgpt.serve.chat import ChatArguments, GenerationOptions, load_chat_engine
from medicalgpt.serve.scheduler import Scheduler
from tests.helpers import QA_PAIRS, REPO, free_port, qa_adapter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")
BOT = '[data-testid="bot"]'
RECORD_BOT_TEXTS = """() => {
    window.botTexts = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.botTexts.push(bots[bots.length - 1].textContent.trim());
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def wait_for_page(url, process=None, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the demo exited: {process.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up in {timeout} s")


def ask(page, question):
    page.fill("textarea", question)
    page.keyboard.press("Enter")


def last_answer(page):
    return page.locator(BOT).last.inner_text().strip()


def test_tutorial_gradio_command_answers_in_the_browser(browser, tiny_model_dir, tmp_path_factory, tmp_path):
    adapter = qa_adapter(tmp_path_factory, tiny_model_dir)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "gradio_demo.py", "--base_model", tiny_model_dir, "--lora_model", adapter,
               "--template_name", "qwen", "--port", str(port), "--temperature", "0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", process)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        (q1, a1), (q2, a2), *_ = QA_PAIRS
        ask(page, q1)
        page.wait_for_function(f"() => document.querySelectorAll('{BOT}').length === 1", timeout=60_000)
        page.wait_for_function(f"() => document.querySelector('{BOT}').textContent.trim() === '{a1}'", timeout=60_000)
        ask(page, q2)  # a second turn, with the first as context
        page.wait_for_function(f"() => document.querySelectorAll('{BOT}').length === 2", timeout=60_000)
        page.wait_for_function(f"() => [...document.querySelectorAll('{BOT}')].pop().textContent.trim() === '{a2}'",
                               timeout=60_000)  # fmt: skip
        screenshot = tmp_path / "gradio.png"
        page.screenshot(path=str(screenshot))
        if os.environ.get("MEDICALGPT_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["MEDICALGPT_SCREENSHOT"])
        assert page.locator('[data-testid="user"]').count() == 2
    finally:
        process.terminate()
        process.wait(30)


class PacedEngine:
    """SharedEngine.stream recorded and paced to 20 pieces a second: the tiny model writes thousands, and a browser
    re-rendering that flood on a busy 2-core machine took clicks longer than 30 s to process."""

    def __init__(self, stream, seconds_per_piece=0.05):
        self.original, self.seen, self.seconds_per_piece = stream, [], seconds_per_piece

    def __call__(self, shared, messages, options):
        self.seen.append(messages)
        pieces = self.original(shared, messages, options)
        try:
            for piece in pieces:
                time.sleep(self.seconds_per_piece)
                yield piece
        finally:
            pieces.close()  # a stop click closes this generator; closing the shared stream ends the generation


def generating(scheduler, seconds=0.5):
    """Whether the worker took a step within `seconds` (after the one that may be under way)."""
    time.sleep(0.3)
    steps = scheduler.steps
    time.sleep(seconds)
    return scheduler.steps != steps


def wait_until(condition, seconds):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_stop_button_and_closed_tab_end_generation_a_long_answer_holds_up_no_other_tab(browser, tiny_model_dir,
                                                                                     monkeypatch):  # fmt: skip
    import gradio_demo

    engine = load_chat_engine(ChatArguments(base_model=tiny_model_dir))  # untrained: long, endless answers
    engine.stop_ids = [len(engine.tokenizer) + 1000]  # an id it can never generate: only max tokens or stop end it
    paced = PacedEngine(gradio_demo.SharedEngine.stream)
    monkeypatch.setattr(gradio_demo.SharedEngine, "stream", lambda shared, m, o: paced(shared, m, o))
    scheduler = Scheduler(engine, max_batch_size=1, stall_timeout=5)
    demo = gradio_demo.build_demo(engine, GenerationOptions(temperature=1.0, top_p=1.0, max_new_tokens=3000),
                                  scheduler=scheduler)  # fmt: skip
    port = free_port()
    demo.queue(default_concurrency_limit=4).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                                   quiet=True)  # fmt: skip
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("textarea")
        page.evaluate(RECORD_BOT_TEXTS)
        ask(page, "Tell me about fever.")
        page.wait_for_function(f"() => (document.querySelector('{BOT}')?.textContent || '').trim().length > 30",
                               timeout=60_000)  # fmt: skip
        page.click('[data-testid="stop-button"]')
        page.wait_for_selector('[data-testid="stop-button"]', state="detached", timeout=30_000)
        wait_until(lambda: scheduler.held == 0, 5)  # stop ends the generation, not only the display
        assert not generating(scheduler)
        stopped = last_answer(page)
        time.sleep(1)
        assert last_answer(page) == stopped, "nothing may be added after stop"
        texts = [text for text in page.evaluate("() => window.botTexts") if text]
        assert len(set(texts)) >= 3, "the answer must appear piece by piece"

        page.click('button[aria-label="Clear"]')
        page.wait_for_selector(BOT, state="detached", timeout=10_000)
        ask(page, "Again.")  # a long answer in this tab ...
        page.wait_for_selector(BOT, timeout=30_000)
        other = browser.new_page()  # ... holds up no answer in another tab
        other.goto(f"http://127.0.0.1:{port}/")
        ask(other, "Me too.")
        other.wait_for_function(f"() => (document.querySelector('{BOT}')?.textContent || '').trim().length > 10",
                                timeout=30_000)  # fmt: skip
        assert scheduler.held == 2 and [len(messages) for messages in paced.seen] == [1, 1, 1]
        page.close()  # closed tabs: their generations end
        other.close()
        wait_until(lambda: scheduler.held == 0, 20)
        assert not generating(scheduler) and scheduler.alive
    finally:
        demo.close()
        scheduler.close()
