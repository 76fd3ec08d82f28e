"""A chat page in the browser: answers stream in as they are generated, the conversation is the context.

    python gradio_demo.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 --template_name qwen
    # then open http://localhost:7860

Every session's answer goes through one generation worker that interleaves them a token at a time
(medicalgpt/serve/scheduler.py): a long answer in one tab does not hold up another. The page has a stop button
(while an answer streams; it ends the generation, as closing the tab does) and a clear button (the bin in the
chat's corner) that starts a new conversation. When the conversation outgrows the model's context, its oldest
exchanges are left out of what the model sees and a notice says so (as in `inference.py --interactive`); the chat
itself stays as it is.
It listens on 127.0.0.1:7860 (`--host 0.0.0.0` to open it to the network, `--port`);
`--share True` asks gradio for a public link (off by default).
"""

import os
import sys
from dataclasses import dataclass, field

from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import ChatArguments, PromptTooLongError, dropped_note, fit_context, load_chat_engine
from medicalgpt.serve.scheduler import Scheduler, ServerBusy, TimedOut

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@dataclass
class DemoArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    share: bool = field(default=False, metadata={"help": "Also serve on a public gradio.live link."})
    title: str = field(default="MedicalGPT", metadata={"help": "Page title."})


def content_text(content):
    """A chat message's content as text (gradio may send a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(content_text(part) for part in content or [])


def history_messages(history):
    """gradio's chat history as user/assistant messages: answered exchanges only (a question left without an answer,
    e.g. one too long for the model, is not sent again)."""
    turns = [
        {"role": turn["role"], "content": content_text(turn["content"])}
        for turn in history
        if turn.get("role") in ("user", "assistant")
    ]
    return [
        turn
        for i, turn in enumerate(turns)
        if turn["role"] == "assistant" or (i + 1 < len(turns) and turns[i + 1]["role"] == "assistant")
    ]


def respond(engine, options, message, history, notify):
    """Stream the answer to `message` after `history`. As inference.py does, a conversation longer than the model's
    context loses its oldest exchanges and `notify` says so; a message too long on its own is only reported: the
    chat, its clear button and the send button stay as they are."""
    messages = history_messages(history) + [{"role": "user", "content": content_text(message)}]
    try:
        messages, dropped = fit_context(engine, messages, options.max_new_tokens)
    except PromptTooLongError as error:
        notify(f"{error}. Shorten the message.")
        return
    if dropped:
        notify(dropped_note(engine, dropped))
    answer = ""
    for piece in engine.stream(messages, options):  # a stop click closes this generator, which ends the generation
        answer += piece
        yield answer


class SharedEngine:
    """The engine as the page's sessions share it: every answer goes through one Scheduler, so sessions take turns a
    token at a time and a long answer holds up no one. An answer nobody reads any more (stop button, closed tab)
    ends: gradio closes its generator, and one left unclosed is parked, then cancelled after `stall_timeout` s."""

    def __init__(self, engine, scheduler):
        self.engine, self.scheduler = engine, scheduler

    def stream(self, messages, options):
        ticket = self.scheduler.submit(self.engine.encode(messages), options)
        try:
            yield from ticket.iter_pieces()
        finally:
            ticket.cancel("the page stopped reading")

    def __getattr__(self, name):  # everything else (fitting the context, encoding) is the engine's
        return getattr(self.engine, name)


def build_demo(engine, options, title="MedicalGPT", scheduler=None):
    """The gradio ChatInterface over `engine`, through `scheduler` (default: one of up to 16 answers at a time, each
    within 300 s, ended when unread for 10 s)."""
    import gradio as gr

    shared = SharedEngine(engine, scheduler or Scheduler(engine, max_queue=16, request_timeout=300, stall_timeout=10))

    def chat(message, history):
        try:
            yield from respond(shared, options, message, history, notify=gr.Warning)
        except (ServerBusy, TimedOut) as error:
            gr.Warning(str(error))

    return gr.ChatInterface(
        chat,
        title=title,
        description="Answers come from a language model and may be wrong; they are no medical advice.",
        textbox=gr.Textbox(placeholder="Ask a question", submit_btn=True, stop_btn=True),
        chatbot=gr.Chatbot(label="Chat", height=480),
        flagging_mode="never",
    )


def main(argv=None):
    chat_args, demo_args = parse_cli((ChatArguments, DemoArguments), argv, description=__doc__)
    setup_logging()
    engine = load_chat_engine(chat_args)
    demo = build_demo(engine, chat_args.generation_options(), demo_args.title)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=demo_args.host, server_port=demo_args.port, share=demo_args.share, footer_links=[]
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
