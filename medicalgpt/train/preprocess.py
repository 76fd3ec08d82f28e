"""Turn validated records into token ids and labels.

Pretraining: every document gets the tokenizer's EOS, documents are concatenated and cut into `block_size` blocks.
The tail shorter than a block is kept as a final, shorter block (padded in its batch, padding not learned): with
little data nothing is lost. Tails are per `.map` batch of 1000 documents, so a large corpus has one short block
per 1000 documents.

SFT: each conversation is rendered turn by turn with the template. Only what the assistant says, with its
end-of-turn token, is learned (labels); prompts, system prompts and tool results are -100. Conversations longer
than `model_max_length` (`--overlong`, counted and logged either way):
- whole turns are kept from the start while they fit; later turns that do not fit are dropped whole;
- `truncate` (the default, as upstream MedicalGPT and LLaMA-Factory do): a first exchange that alone does not fit is
  cut to fit. Its prompt keeps its head, up to PROMPT_SHARE of the length unless the answer needs less; the answer
  keeps its start, cut where the length ends. A cut answer has lost its end: it learns no end-of-turn token, so the
  model is not taught to stop mid-answer. Trade-off: the model learns the opening of long answers, not their end.
- `drop`: such a conversation is skipped whole (the model never sees long answers, and learns to answer shorter).
"""

import functools
import hashlib
import logging
from itertools import chain
from pathlib import Path

import datasets

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.templates import ConversationTemplate, TokenizerTemplate, encode_texts, leading_bos
from medicalgpt.templates.tokenizer import plain_backend

logger = logging.getLogger(__name__)

PT_MAP_BATCH = 1000
OVERLONG_POLICIES = ("truncate", "drop")
# A cut first exchange keeps at most this share of the length for its prompt when the answer needs the rest: answers
# are what SFT learns, and the question's head says what is asked.
PROMPT_SHARE = 0.5


def prepare_pretraining_dataset(dataset, tokenizer, block_size, num_proc=None, desc_suffix=""):
    """Dataset of {"text"} -> dataset of {"input_ids", "labels"} blocks of `block_size` tokens (the last shorter).
    No dataset (None: a split not asked for) gives None."""
    if dataset is None:
        return None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token to end documents with.")

    key = (tokenizer, None, "pt", block_size)  # what the blocks depend on: tokenising_fingerprint

    def tokenize_and_group(batch):  # one pass: no intermediate dataset of every document's ids is written and reread
        ids = encode_texts(tokenizer, batch["text"], add_special_tokens=True)
        stream = list(chain.from_iterable(doc + [eos] for doc in ids))
        blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    return dataset.map(
        tokenize_and_group,
        batched=True,
        batch_size=PT_MAP_BATCH,
        remove_columns=dataset.column_names,
        **_map_options(dataset, num_proc, f"Tokenising into {block_size}-token blocks{desc_suffix}", *key),
    )


def _map_options(dataset, num_proc, desc, tokenizer=None, template=None, *settings):
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
    tokenizer's serialised backend, the template, the settings and the source of this module and of the templates.

    Without it datasets hashes the map's function by pickling its closure, the tokenizer included: ~1.3 s for
    Qwen2.5's 151k-token vocabulary, on every split of every run. None (datasets hashes as usual) for a tokenizer
    or template this cannot describe cheaply."""
    backend = plain_backend(tokenizer)
    if backend is None or not isinstance(template, (ConversationTemplate, TokenizerTemplate, type(None))):
        return None
    if isinstance(template, TokenizerTemplate):
        template = ("tokenizer", tokenizer.chat_template, template.chat_template_kwargs)
    tokenizer_key = (backend.to_str(), type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token_id)
    key = [dataset._fingerprint, tokenizer_key, repr(template), settings, _code_hash()]
    return hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _code_hash():
    """A hash of the code that turns records into ids: this module and the templates package."""
    package = Path(__file__).resolve().parents[1]
    files = [Path(__file__).resolve(), *sorted((package / "templates").rglob("*.py"))]
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def tokenize_conversation(
    record, template, tokenizer, max_length=None, train_on_inputs=False, system_prompt=None, overlong="truncate"
):
    """One normalised SFT record -> input_ids, labels, the number of later turns dropped to fit `max_length` and
    whether the first exchange was cut (`overlong="truncate"`). Empty ids: skipped (`overlong="drop"`)."""
    turns = render_conversation(record, template, system_prompt)
    turn_ids = [tokenizer.encode(text, add_special_tokens=False) for turn in turns for text in turn]
    return assemble_conversation(turns, turn_ids, tokenizer, max_length, train_on_inputs, overlong)


def render_conversation(record, template, system_prompt=None):
    """A normalised SFT record -> its (prompt, response) texts, turn by turn, as the template renders them."""
    system = record.get("system")
    return template.render_turns(
        record["messages"], system_prompt=system if system is not None else system_prompt, tools=record.get("tools")
    )


def assemble_conversation(turns, turn_ids, tokenizer, max_length, train_on_inputs, overlong):
    """`tokenize_conversation` from rendered `turns` and their texts' ids (prompt, response, prompt, ...)."""
    input_ids = leading_bos(tokenizer, turns[0][0]) if turns else []
    labels = [IGNORE_INDEX] * len(input_ids)
    kept, truncated = 0, False
    for prompt_ids, response_ids in zip(turn_ids[::2], turn_ids[1::2]):
        if max_length and len(input_ids) + len(prompt_ids) + len(response_ids) > max_length:
            if kept or overlong == "drop":
                break
            prompt_ids, response_ids = cut_first_exchange(prompt_ids, response_ids, max_length - len(input_ids))
            if not response_ids:  # nothing left to learn
                break
            truncated = True
        input_ids += prompt_ids + response_ids
        labels += (prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
        kept += 1
    if kept == 0:
        input_ids, labels = [], []
    return {"input_ids": input_ids, "labels": labels, "dropped_turns": len(turns) - kept, "truncated": truncated}


def cut_first_exchange(prompt_ids, response_ids, budget):
    """A first exchange cut to `budget` tokens: the prompt's head, up to PROMPT_SHARE of the budget unless the answer
    needs less, then the answer's start in what remains. The end-of-turn token ends the answer, so a cut answer never
    holds it."""
    prompt_keep = min(len(prompt_ids), max(budget - len(response_ids), int(budget * PROMPT_SHARE)))
    return prompt_ids[:prompt_keep], response_ids[: max(0, budget - prompt_keep)]


def prepare_sft_dataset(
    dataset,
    template,
    tokenizer,
    max_length,
    train_on_inputs=False,
    system_prompt=None,
    num_proc=None,
    desc_suffix="",
    overlong="truncate",
):
    """Dataset of normalised SFT records -> {"input_ids", "labels"}; logs the conversations cut, shortened and
    skipped to fit `max_length` (`overlong`: see the module docstring). Batched, and cached when the dataset is backed
    by files (`medicalgpt.train.records`): tokenised once per data and settings. None (a split not asked for) gives
    None."""
    if dataset is None:
        return None
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    columns = ("input_ids", "labels", "dropped_turns", "truncated")

    def tokenize(batch):  # one fast-tokenizer call for every turn of the batch (encode_texts): no per-text overhead
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rendered = [render_conversation(record, template, system_prompt) for record in records]
        texts = [text for turns in rendered for turn in turns for text in turn]
        ids = iter(encode_texts(tokenizer, texts))
        out = [
            assemble_conversation(turns, [next(ids) for _ in range(2 * len(turns))], tokenizer, max_length,
                                  train_on_inputs, overlong)
            for turns in rendered
        ]  # fmt: skip
        return {key: [row[key] for row in out] for key in columns}

    settings = ("sft", max_length, train_on_inputs, system_prompt, overlong)
    dataset = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        **_map_options(dataset, num_proc, f"Tokenising conversations{desc_suffix}", tokenizer, template, *settings),
    )
    if isinstance(dataset, datasets.IterableDataset):  # streamed: medicalgpt.train.streaming counts as it goes
        return dataset
    skipped = _log_overlong(dataset, max_length)
    if skipped:
        dataset = dataset.filter(
            lambda batch: [len(ids) > 0 for ids in batch],
            input_columns="input_ids",
            batched=True,
            num_proc=num_proc,
            desc="Skipping too-long",
        )
    return dataset.remove_columns(["dropped_turns", "truncated"])


def _log_overlong(dataset, max_length):
    """Log how many conversations were cut, lost later turns or were skipped; returns the number skipped."""
    lengths = sequence_lengths(dataset)
    dropped = [n for n, length in zip(dataset["dropped_turns"], lengths) if n and length]
    truncated = sum(dataset["truncated"])
    skipped = lengths.count(0)
    if truncated:
        logger.warning(
            "%d conversations were truncated: their first exchange alone is longer than model_max_length=%d, so it "
            "was cut to fit (a cut answer learns no end-of-turn token). --overlong drop skips them instead.",
            truncated,
            max_length,
        )
    if dropped:
        logger.warning(
            "%d conversations were longer than model_max_length=%d: their last %d turns in all were dropped.",
            len(dropped),
            max_length,
            sum(dropped),
        )
    if skipped:
        logger.warning(
            "%d conversations were skipped: their first exchange alone is longer than model_max_length=%d "
            "(--overlong drop) or leaves no answer token. Raise --model_max_length to keep them.",
            skipped,
            max_length,
        )
    return skipped


def sequence_lengths(dataset, column="input_ids"):
    """Token counts of a tokenised dataset, read from its Arrow data (no Python lists of token ids)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def format_label_mask(input_ids, labels, tokenizer, start="[LEARN]", end="[/LEARN]"):
    """Decoded text with the supervised spans marked, e.g. `...assistant\n[LEARN]Hello<|im_end|>[/LEARN]...`."""
    pieces, span, learning = [], [], None
    for token_id, label in zip(input_ids, labels):
        is_learned = label != IGNORE_INDEX
        if learning is not None and is_learned != learning:
            pieces.append(_decorate(tokenizer.decode(span), learning, start, end))
            span = []
        span.append(token_id)
        learning = is_learned
    if span:
        pieces.append(_decorate(tokenizer.decode(span), learning, start, end))
    return "".join(pieces)


def _decorate(text, learned, start, end):
    return f"{start}{text}{end}" if learned else text


def tokenize_preference(record, template, tokenizer, max_source_length, max_target_length, system_prompt=None):
    """One normalised preference record -> prompt_ids, chosen_ids, rejected_ids (responses end with the stop token).

    The prompt keeps its last `max_source_length` tokens, each response its first `max_target_length`."""
    system = record.get("system")
    turns = template.render_turns(
        record["messages"], system_prompt=system if system is not None else system_prompt, tools=record.get("tools")
    )
    prompt = "".join(p + r for p, r in turns)
    prompt_ids = leading_bos(tokenizer, prompt) + tokenizer.encode(prompt, add_special_tokens=False)
    chosen_ids = tokenizer.encode(record["chosen"] + template.stop_str, add_special_tokens=False)
    rejected_ids = tokenizer.encode(record["rejected"] + template.stop_str, add_special_tokens=False)
    truncated = len(prompt_ids) > max_source_length or max(len(chosen_ids), len(rejected_ids)) > max_target_length
    return {
        "prompt_ids": prompt_ids[-max_source_length:],
        "chosen_ids": chosen_ids[:max_target_length],
        "rejected_ids": rejected_ids[:max_target_length],
        "truncated": truncated,
    }


def prepare_preference_dataset(
    dataset, template, tokenizer, max_source_length, max_target_length, system_prompt=None, num_proc=None, desc=""
):
    """Dataset of normalised preference records -> {"prompt_ids", "chosen_ids", "rejected_ids"}."""

    def tokenize(record):
        return tokenize_preference(record, template, tokenizer, max_source_length, max_target_length, system_prompt)

    dataset = dataset.map(
        tokenize, num_proc=num_proc, remove_columns=dataset.column_names, desc=f"Tokenising preference pairs{desc}"
    )
    truncated = sum(dataset["truncated"])
    if truncated:
        logger.warning(
            "%d of %d pairs were truncated to --max_source_length %d / --max_target_length %d tokens.",
            truncated,
            len(dataset),
            max_source_length,
            max_target_length,
        )
    return dataset.remove_columns("truncated")


def to_reward_features(dataset, num_proc=None, suffix_ids=()):
    """Pairwise features for trl's RewardTrainer: the full renderings of the conversations, prompt + response (which
    ends with the stop token) + `suffix_ids`, the template's closing suffix (`medicalgpt.rl.rewards.closing_ids`), as
    the official chat template renders them and as PPO, RLOO/GRPO and other tools feed them to the reward model.
    None (a split not asked for) gives None."""
    if dataset is None:
        return None
    suffix_ids = list(suffix_ids)
    return dataset.map(
        lambda row: {
            "chosen_ids": row["prompt_ids"] + row["chosen_ids"] + suffix_ids,
            "rejected_ids": row["prompt_ids"] + row["rejected_ids"] + suffix_ids,
        },
        remove_columns=["prompt_ids"],
        num_proc=num_proc,
        desc="Building reward pairs",
    )


def prepare_rl_prompts(records, template, tokenizer, max_source_length, system_prompt=None):
    """Token ids of every prompt in SFT records: each assistant turn's full preceding context, rendered with the
    template up to the generation prompt; the last `max_source_length` tokens are kept."""
    prompts = []
    for record in records:
        system = record.get("system") if record.get("system") is not None else system_prompt
        for index, message in enumerate(record["messages"]):
            if message["role"] not in ("assistant", "function_call"):
                continue
            turns = template.render_turns(record["messages"][:index], system_prompt=system, tools=record.get("tools"))
            text = "".join(p + r for p, r in turns)
            ids = leading_bos(tokenizer, text) + tokenizer.encode(text, add_special_tokens=False)
            prompts.append(ids[-max_source_length:])
    return prompts
