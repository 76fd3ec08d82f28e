"""Embeddings for the tokens a domain tokenizer added (medicalgpt.data.vocab, build_domain_tokenizer.py).

`resize_embeddings_for_tokenizer` (called by the training scripts right after loading the model) initialises the
embedding row of each new token, input and output embeddings alike, with the mean of the rows of the sub-tokens
it replaces, so the model starts from what it made of the term before. These rows are initialised: the rows added
because the tokenizer outgrew the model, and the rows of tokens listed in `added_tokens_init.json` that the model
already has but never trained (near-zero: Qwen2.5 pads its 151,665 tokens to 151,936 rows, so up to 271 new
tokens land in padding rows). Rows that hold trained values are never reset, so passing the same tokenizer folder
again (e.g. to SFT on the merged PT model) is safe. A new token without an entry in that file (a tokenizer
extended elsewhere) gets the mean of all the base rows.
"""

from __future__ import annotations

import json
import logging
import os

from medicalgpt.data.vocab import INIT_FILE
from medicalgpt.errors import UsageError

logger = logging.getLogger(__name__)

UNTRAINED_NORM = 1e-3  # a row whose norm is below this fraction of the median row's was never trained


def _load_sources(tokenizer) -> tuple[dict[int, list[int]], int | None]:
    path = os.path.join(getattr(tokenizer, "name_or_path", "") or "", INIT_FILE)
    if not os.path.isfile(path):
        return {}, None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    sources = {entry["id"]: entry["base_ids"] for entry in data["tokens"]}
    logger.info("New-token embeddings from %s (%d tokens)", path, len(sources))
    return sources, data.get("base_vocab_size")


def _untrained(weight, ids: list[int], rows: int) -> set[int]:
    """The rows among `ids` that were never trained: norm below UNTRAINED_NORM of the median row's (zero, or
    decayed to nothing, as a model's padding rows are)."""
    norms = weight[:rows].float().norm(dim=1)
    limit = UNTRAINED_NORM * norms.median()
    return {i for i in ids if norms[i] <= limit}


def _check_zero3_embeddings(tokenizer, rows, sources) -> int:
    """Under ZeRO-3 the rows cannot be read or written here: a tokenizer larger than the model is a usage error, and
    rows the extension listed are taken as they are (initialised by the run that grew them)."""
    if len(tokenizer) > rows:
        raise UsageError(
            f"The tokenizer has {len(tokenizer) - rows} tokens more than the model's embeddings: grow them in a run "
            "without DeepSpeed ZeRO-3 (e.g. a short PT run, or ZeRO-2), then train that output under ZeRO-3."
        )
    if sources:
        logger.warning("ZeRO-3: the embedding rows of the %d extension tokens are used as loaded.", len(sources))
    return 0


def resize_embeddings_for_tokenizer(model, tokenizer) -> int:
    """Grow the model's embeddings to the tokenizer and initialise the new tokens' rows from their sub-tokens (see
    the module docstring). Returns how many rows were initialised (0: nothing to do)."""
    import torch

    embeddings = model.get_input_embeddings().weight
    # Under DeepSpeed ZeRO-3 each rank holds a slice (shape 0 here): the real size is ds_shape. Read as 0 rows, every
    # row counted as new and was overwritten with the mean of nothing (NaN) -- tests/train/test_scaleout.py.
    rows = embeddings.ds_shape[0] if hasattr(embeddings, "ds_shape") else embeddings.shape[0]
    sources, base_size = _load_sources(tokenizer)
    if hasattr(embeddings, "ds_shape"):
        return _check_zero3_embeddings(tokenizer, rows, sources)
    inside = [i for i in sources if i < min(rows, len(tokenizer))]  # listed tokens in rows the model already has
    fresh = _untrained(model.get_input_embeddings().weight, inside, rows) if inside else set()
    if len(fresh) < len(inside):
        logger.info("%d new tokens already have trained embeddings: kept", len(inside) - len(fresh))
    new_ids = sorted(set(range(rows, len(tokenizer))) | fresh)
    if not new_ids:
        return 0
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new, base_rows = set(new_ids), min(rows, base_size or rows)
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:  # untied: the output head gets its own means
        weights.append(output.weight)
    with torch.no_grad():
        for weight in weights:
            fallback = weight[[i for i in range(base_rows) if i not in new]].float().mean(0)
            for token_id in new_ids:
                parts = [i for i in sources.get(token_id, ()) if i not in new and i < base_rows]
                weight[token_id] = (weight[parts].float().mean(0) if parts else fallback).to(weight.dtype)
    from_parts = sum(1 for i in new_ids if sources.get(i))
    logger.warning(
        "Embeddings: %d rows -> %d; %d new-token rows initialised (%d from the mean of their sub-tokens, %d from "
        "the mean of all rows). Train them with --modules_to_save embed_tokens,lm_head (LoRA) or full weights.",
        rows,
        model.get_input_embeddings().weight.shape[0],
        len(new_ids),
        from_parts,
        len(new_ids) - from_parts,
    )
    return len(new_ids)
