"""A chat page in the browser: answers stream in as they are generated, the conversation is the context.

    python gradio_demo.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 --template_name qwen
    # then open http://localhost:7860

The page has a stop button (while an answer streams) and a clear button (the bin in the chat's corner) that starts
a new conversation. It listens on 127.0.0.1:7860 (`--host 0.0.0.0` to open it to the network, `--port`);
`--share True` asks gradio for a public link (off by default).
"""

import os
import sys
from dataclasses import dataclass, field

from medicalgpt.chat import ChatArguments, PromptTooLongError, load_chat_engine, parse_cli, setup_logging
from medicalgpt.training import run_cli

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


def build_demo(engine, options, title="MedicalGPT"):
    """The gradio ChatInterface over `engine`; every session shares it (its lock serialises generation)."""
    import gradio as gr

    def respond(message, history):
        messages = [
            {"role": turn["role"], "content": content_text(turn["content"])}
            for turn in history
            if turn.get("role") in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": content_text(message)})
        try:
            stream = engine.stream(messages, options)
        except PromptTooLongError as error:
            raise gr.Error(f"{error}. Clear the conversation to go on.") from error
        answer = ""
        for piece in stream:  # a stop click closes this generator, which ends the generation
            answer += piece
            yield answer

    return gr.ChatInterface(
        respond,
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
