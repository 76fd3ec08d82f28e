"""Serve a model over HTTP: upstream's `POST /chat` and an OpenAI-compatible API (medicalgpt/serve/server.py).

    python fastapi_server_demo.py --base_model Qwen/Qwen2.5-0.5B-Instruct \\
        --lora_model outputs-sft-qwen-v1 --template_name qwen --port 8008 --api_key "$MY_KEY"

    curl http://127.0.0.1:8008/chat -H "Authorization: Bearer $MY_KEY" -H 'Content-Type: application/json' \\
        -d '{"input": "小孩发烧怎么办？"}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8008/v1", api_key=MY_KEY)
    model = client.models.list().data[0].id
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "小孩发烧怎么办？"}])
    for chunk in client.chat.completions.create(model=model, messages=[...], stream=True): ...
    client.chat.completions.create(model=model, messages=[...], tools=[...])   # -> message.tool_calls (tools.py)

The server listens on 127.0.0.1 unless `--host 0.0.0.0` is given. `--api_key` (or the MEDICALGPT_API_KEY
environment variable) makes every request need `Authorization: Bearer KEY`. Requests that leave out max_tokens,
temperature or top_p get this command's `--max_new_tokens`, `--temperature` and `--top_p`.

No client can stall the others: generations are interleaved a token at a time (a short answer is not held up by a
long one), a client that hangs up stops its generation, and the limits answer the way HTTP clients expect:
`--max_queue` requests at once (then 503 with Retry-After), `--request_timeout` seconds per request (then 504),
`--max_tokens_limit` tokens per answer (400 above it). SIGTERM and Ctrl-C end every generation and exit in seconds.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.errors import UsageError
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import ChatArguments, load_chat_engine
from medicalgpt.serve.server import ServerLimits, build_app, run_server

logger = logging.getLogger("medicalgpt")
API_KEY_ENV = "MEDICALGPT_API_KEY"


@dataclass
class ServerArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8008, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None, metadata={"help": f"Require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, else none)."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model id in the API (default: the adapter's or model's folder name)."}
    )
    max_batch_size: int = field(default=8, metadata={"help": "Most waiting requests generated as one batch."})
    max_queue: int = field(
        default=ServerLimits.max_queue,
        metadata={"help": "Most requests held at once, generating or waiting; more get 503 with Retry-After."},
    )
    request_timeout: float = field(
        default=ServerLimits.request_timeout,
        metadata={"help": "Seconds a request may take; then 504 and its generation stops."},
    )
    max_tokens_limit: int = field(
        default=ServerLimits.max_tokens_limit,
        metadata={"help": "The most max_tokens a request may ask for (400 above it); also caps --max_new_tokens."},
    )

    def limits(self):
        if min(self.max_queue, self.max_tokens_limit, self.max_batch_size) < 1 or self.request_timeout <= 0:
            raise UsageError("--max_queue, --max_tokens_limit, --max_batch_size must be >= 1, --request_timeout > 0")
        return ServerLimits(self.max_queue, self.request_timeout, self.max_tokens_limit)


def served_name(chat_args, server_args):
    path = chat_args.lora_model or chat_args.base_model
    return server_args.served_model_name or os.path.basename(os.path.normpath(path))


def main(argv=None):
    chat_args, server_args = parse_cli((ChatArguments, ServerArguments), argv, description=__doc__)
    setup_logging()
    api_key = server_args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and server_args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s without an API key: anyone who can reach it can use it.", server_args.host)
    limits = server_args.limits()
    engine = load_chat_engine(chat_args)
    name = served_name(chat_args, server_args)
    defaults = chat_args.generation_options(max_new_tokens=min(chat_args.max_new_tokens, limits.max_tokens_limit))
    app = build_app(engine, name, api_key, defaults, server_args.max_batch_size, limits)
    logger.info("Serving %r on http://%s:%d (OpenAI API under /v1)", name, server_args.host, server_args.port)
    run_server(app, server_args.host, server_args.port)


if __name__ == "__main__":
    sys.exit(run_cli(main))
