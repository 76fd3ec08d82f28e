"""SFT records -> token ids and label masks.

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

import logging

import datasets

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.fingerprint import map_options
from medicalgpt.templates import encode_texts, leading_bos

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("truncate", "drop")
# A cut first exchange keeps at most this share of the length for its prompt when the answer needs the rest: answers
# are what SFT learns, and the question's head says what is asked.
PROMPT_SHARE = 0.5
# The tokenised columns' types, given to `.map`: without them datasets 5.2 (read there: ArrowWriter with map's default
# on_mixed_types="use_json") walks every token id in Python looking for mixed types, ~10% of the tokenising time.
COLUMNS = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),  # the type datasets infers for input_ids
        "labels": datasets.List(datasets.Value("int64")),
        "dropped_turns": datasets.Value("int64"),
        "truncated": datasets.Value("bool"),
    }
)


def tokenize_conversation(
    record, template, tokenizer, max_length=None, train_on_inputs=False, system_prompt=None, overlong="truncate"
):
    """One normalised SFT record -> input_ids, labels, the number of later turns dropped to fit `max_length` and
    whether the first exchange was cut (`overlong="truncate"`). Empty ids: skipped (`overlong="drop"`)."""
    turns = render_conversation(record, template, system_prompt)
    turn_ids = [tokenizer.encode(text, add_special_tokens=False) for turn in turns for text in turn]
    bos = leading_bos(tokenizer, turns[0][0]) if turns else []
    return assemble_conversation(turns, turn_ids, bos, max_length, train_on_inputs, overlong)


def render_conversation(record, template, system_prompt=None):
    """A normalised SFT record -> its (prompt, response) texts, turn by turn, as the template renders them."""
    system = record.get("system")
    return template.render_turns(
        record["messages"], system_prompt=system if system is not None else system_prompt, tools=record.get("tools")
    )


def assemble_conversation(turns, turn_ids, bos, max_length, train_on_inputs, overlong):
    """`tokenize_conversation` from rendered `turns`, their texts' ids (prompt, response, prompt, ...) and the BOS
    ids that go first (`leading_bos`)."""
    input_ids = list(bos)
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
    bos = leading_bos(tokenizer, "")  # the BOS the tokenizer adds, for texts that do not start with it
    bos_token = tokenizer.bos_token or "\0"

    def tokenize(batch):  # one fast-tokenizer call for every turn of the batch (encode_texts): no per-text overhead
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rendered = [render_conversation(record, template, system_prompt) for record in records]
        texts = [text for turns in rendered for turn in turns for text in turn]
        ids = iter(encode_texts(tokenizer, texts))
        out = [
            assemble_conversation(
                turns,
                [next(ids) for _ in range(2 * len(turns))],
                [] if not turns or turns[0][0].startswith(bos_token) else bos,
                max_length,
                train_on_inputs,
                overlong,
            )
            for turns in rendered
        ]
        return {key: [row[key] for row in out] for key in COLUMNS}

    settings = ("sft", max_length, train_on_inputs, system_prompt, overlong)
    dataset = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        features=COLUMNS,
        **map_options(dataset, num_proc, f"Tokenising conversations{desc_suffix}", tokenizer, template, *settings),
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
    columns = dataset.with_format("arrow")  # whole columns read at once: iterating them decodes row by row
    dropped = [n for n, length in zip(columns["dropped_turns"].to_pylist(), lengths) if n and length]
    truncated = sum(columns["truncated"].to_pylist())
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
