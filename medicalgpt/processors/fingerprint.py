"""The cache key of a tokenising `.map`, and the `.map` options every stage's tokenisation shares."""

import functools
import hashlib
from pathlib import Path

import datasets

from medicalgpt.templates import ConversationTemplate, TokenizerTemplate
from medicalgpt.templates.tokenizer import plain_backend


def map_options(dataset, num_proc, desc, tokenizer=None, template=None, *settings):
    """`.map` options of a Dataset; a streamed IterableDataset (--streaming) takes none. A tokenising map (given its
    tokenizer, template and settings) also gets its cache key from `tokenising_fingerprint`."""
    if isinstance(dataset, datasets.IterableDataset):
        return {}
    options = {"num_proc": num_proc, "desc": desc}
    if tokenizer is not None:
        options["new_fingerprint"] = tokenising_fingerprint(dataset, tokenizer, template, *settings)
    return options


def tokenising_fingerprint(dataset, tokenizer, template, *settings):
    """The cache key of a tokenising `.map`, from what decides its output: the records (their fingerprint), the
    tokenizer's serialised backend, the template, the settings and the source of the processors and templates packages.

    Without it datasets hashes the map's function by pickling its closure, the tokenizer included: ~1.3 s for
    Qwen2.5's 151k-token vocabulary, on every split of every run. None (datasets hashes as usual) for a tokenizer
    or template this cannot describe cheaply."""
    backend = plain_backend(tokenizer)
    if backend is None or not isinstance(template, (ConversationTemplate, TokenizerTemplate, type(None))):
        return None
    if isinstance(template, TokenizerTemplate):
        template = ("tokenizer", tokenizer.chat_template, template.chat_template_kwargs)
    serialised = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()  # repr() of 4 MB of JSON is slower
    tokenizer_key = (serialised, type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token_id)
    key = [dataset._fingerprint, tokenizer_key, repr(template), settings, _code_hash()]
    return hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _code_hash():
    """A hash of the code that turns records into ids: the processors and templates packages."""
    package = Path(__file__).resolve().parents[1]
    files = [*sorted((package / "processors").rglob("*.py")), *sorted((package / "templates").rglob("*.py"))]
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()
