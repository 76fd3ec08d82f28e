"""Models for the server's robustness tests: random Llama models of SmolLM2-135M's shape (bench/server_stall.py),
built by hand so that the tests need no download; greedy, they rarely meet a stop token."""

import pytest


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory, tiny_model_dir):
    """slow_model(layers) -> the folder of a random model of SmolLM2-135M's shape with `layers` of its 30 layers
    (30: tens of ms a token on 2 cores) and the tiny model's tokenizer; built once per session and size."""
    from bench.server_stall import build_slow_model

    def build(layers=30):
        folder = tmp_path_factory.getbasetemp() / f"smollm2-shape-{layers}"
        return build_slow_model(str(folder), tiny_model_dir, layers)

    return build


@pytest.fixture(scope="module")
def endless_engine(tiny_model_dir):
    """The untrained tiny model with an end-of-turn id it can never generate: only the token limit ends an answer."""
    from medicalgpt.serve.chat import ChatArguments, load_chat_engine

    engine = load_chat_engine(ChatArguments(base_model=tiny_model_dir))
    engine.stop_ids = [len(engine.tokenizer) + 1000]
    return engine
