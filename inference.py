"""Chat with a model on the terminal, or answer a file of prompts in batches.

    python inference.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 --interactive
    python inference.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 \\
        --data_file input.jsonl --output_file output.jsonl --template_name qwen --batch_size 8
    python inference.py --base_model merged-sft-qwen-v1 --data_file questions.txt --temperature 0   # greedy

Interactive: answers stream as they are generated; the whole conversation is the context of each answer (when it
no longer fits the model's context, its oldest exchanges are left out, and you are told). Type `clear` to start
over, `exit` (or Ctrl-D) to quit; Ctrl-C stops an answer. Lines pasted at once are one message; so is everything
typed between two lines that hold only three double quotes.

Batch: `--data_file` is `.txt` (one prompt per line) or `.jsonl` (`prompt`, `instruction`+`input`, `question`,
`messages` or `conversations` records; see
medicalgpt/data/prompt_files.py), checked line by line before the model loads.
`--output_file` gets one JSON line per input, in input order: the input record plus `output`. Prompts are
left-padded into batches of `--batch_size`; each answer ends at the template's end-of-turn token.
`--use_vllm` generates the batch with vLLM instead (GPU; `pip install vllm`).

Several processes (one per GPU, or CPU processes): `torchrun --nproc_per_node 4 inference.py --data_file F ...`.
Each rank loads the model on its own GPU and answers a contiguous quarter of the prompts; rank 0 gathers the
answers and writes `--output_file` once, in input order, the same file one process writes.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.data.prompt_files import load_prompt_records
from medicalgpt.errors import UsageError
from medicalgpt.parser import parse_cli
from medicalgpt.serve.batch_inference import (
    check_prompts,
    init_process_group,
    run_batch,
    run_distributed_batch,
    run_vllm_batch,
    world_size,
)
from medicalgpt.serve.chat import ChatArguments, PromptTooLongError, dropped_note, fit_context, load_chat_engine

logger = logging.getLogger("medicalgpt")
EXIT_COMMANDS = ("exit", "quit", ":exit", ":quit", "/exit")
CLEAR_COMMANDS = ("clear", ":clear", "/clear")
BLOCK_QUOTE = '"""'  # a line of its own starts and ends a multi-line message
PASTE_WAIT_S = 0.02  # how long after a line more pasted input may take to arrive


@dataclass
class InferenceArguments:
    interactive: bool = field(default=False, metadata={"help": "Multi-turn chat on the terminal."})
    data_file: str | None = field(default=None, metadata={"help": "Prompts to answer: .txt or .jsonl."})
    output_file: str = field(default="predictions.jsonl", metadata={"help": "Where batch answers go (jsonl)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together in batch mode."})
    use_vllm: bool = field(default=False, metadata={"help": "Batch mode with vLLM (GPU; pip install vllm)."})


def input_is_pending(stream=None):
    """Whether more typed or pasted input is already waiting on the terminal (a paste arrives all at once; a terminal
    in line mode hands it over one line per read). False when the input is not a terminal: a pipe gives one message
    per line."""
    stream = stream or sys.stdin
    if not stream.isatty():
        return False
    import select

    return bool(select.select([stream], [], [], PASTE_WAIT_S)[0])


def read_message(read=input, pending=input_is_pending):
    """One user message: a line, with the lines pasted together with it; or, between two lines of three double
    quotes, everything typed."""
    first = read("User: ")
    if first.strip() == BLOCK_QUOTE:
        lines = []
        while (line := read("... ")).strip() != BLOCK_QUOTE:
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while pending():
        lines.append(read(""))
    return "\n".join(lines)


def chat_loop(engine, options, read=input, write=sys.stdout.write, pending=input_is_pending):
    """The terminal chat: streams each answer and keeps the full history (questions and answers)."""
    write(
        "Chat with the model. 'clear' forgets the conversation, 'exit' quits; Ctrl-C stops an answer. Pasted lines "
        f"are one message; so is what you type between two lines of {BLOCK_QUOTE}.\n"
    )
    history = []
    while True:
        try:
            query = read_message(read, pending)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if query.strip() in EXIT_COMMANDS:
            return
        if query.strip() in CLEAR_COMMANDS:
            history = []
            write("History cleared.\n")
            continue
        if not query.strip():
            continue
        try:
            conversation = history + [{"role": "user", "content": query}]
            messages, dropped = fit_context(engine, conversation, options.max_new_tokens)
        except PromptTooLongError as error:
            write(f"Error: {error}. Shorten the message.\n")
            continue
        if dropped:
            write(f"({dropped_note(engine, dropped)})\n")
        stream = engine.stream(messages, options)
        write("Assistant: ")
        answer = ""
        try:
            for piece in stream:
                answer += piece
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        history = messages + [{"role": "assistant", "content": answer}]


def main(argv=None):
    chat_args, args = parse_cli((ChatArguments, InferenceArguments), argv, description=__doc__)
    setup_logging()
    if args.interactive == bool(args.data_file):
        raise UsageError("pass either --interactive or --data_file FILE (with --output_file)")
    if args.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    if world_size() > 1 and (args.interactive or args.use_vllm):
        raise UsageError(
            "under torchrun, inference.py answers a --data_file with transformers (no --interactive, "
            "no --use_vllm: vLLM spreads one process over GPUs itself)"
        )
    items = load_prompt_records(args.data_file) if args.data_file else None
    if args.use_vllm:
        if not items:
            raise UsageError("--use_vllm works in batch mode (--data_file)")
        run_vllm_batch(chat_args, items, args.output_file)
        return
    engine = load_chat_engine(chat_args)
    options = chat_args.generation_options()
    if args.interactive:
        chat_loop(engine, options)
        return
    check_prompts(engine, items, args.data_file, options.max_new_tokens)  # every rank checks all: all stop together
    if world_size() > 1:
        init_process_group()
        run_distributed_batch(engine, items, options, args.output_file, args.batch_size)
    else:
        run_batch(engine, items, options, args.output_file, args.batch_size)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("%d answers written to %s", len(items), args.output_file)


if __name__ == "__main__":
    sys.exit(run_cli(main))
