"""Pretraining text -> blocks of token ids.

Pretraining: every document gets the tokenizer's EOS, documents are concatenated and cut into `block_size` blocks.
The tail shorter than a block is kept as a final, shorter block (padded in its batch, padding not learned): with
little data nothing is lost. Tails are per `.map` batch of 1000 documents, so a large corpus has one short block
per 1000 documents.
"""

from itertools import chain

from medicalgpt.processors.fingerprint import map_options
from medicalgpt.templates import encode_texts

PT_MAP_BATCH = 1000


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
        **map_options(dataset, num_proc, f"Tokenising into {block_size}-token blocks{desc_suffix}", *key),
    )
