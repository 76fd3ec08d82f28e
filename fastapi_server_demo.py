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
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import ChatArguments, load_chat_engine
from medicalgpt.serve.server import build_app

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


def served_name(chat_args, server_args):
    path = chat_args.lora_model or chat_args.base_model
    return server_args.served_model_name or os.path.basename(os.path.normpath(path))


def main(argv=None):
    import uvicorn

    chat_args, server_args = parse_cli((ChatArguments, ServerArguments), argv, description=__doc__)
    setup_logging()
    api_key = server_args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and server_args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s without an API key: anyone who can reach it can use it.", server_args.host)
    engine = load_chat_engine(chat_args)
    name = served_name(chat_args, server_args)
    app = build_app(engine, name, api_key, chat_args.generation_options(), server_args.max_batch_size)
    logger.info("Serving %r on http://%s:%d (OpenAI API under /v1)", name, server_args.host, server_args.port)
    uvicorn.run(app, host=server_args.host, port=server_args.port, log_level="info")


if __name__ == "__main__":
    sys.exit(run_cli(main))
