"""KTO records -> token ids: one example per judged answer, {"prompt_ids", "completion_ids", "label"}.

The prompt and the answer are tokenised exactly as DPO tokenises a pair (`tokenize_preference`: the template's
rendering of the context up to the generation prompt, the answer ending with the template's stop token, the prompt's
last `max_source_length` tokens and the answer's first `max_target_length`), so SFT, DPO and KTO see one format. A
preference pair gives two examples: its chosen answer (label true) and its rejected answer (label false).

trl's KTOTrainer estimates the KL term from mismatched (prompt, answer) pairs within each batch and so reads the
training data in order: `medicalgpt.train.records.load_tokenized_unpaired` shuffles the examples once (with the
run's seed), or a file sorted by label would give batches of one class, and a split pair's two answers would sit
side by side.
"""

import logging

from medicalgpt.processors.preference import tokenize_preference

logger = logging.getLogger("medicalgpt")

COLUMNS = ("prompt_ids", "completion_ids", "label", "truncated")


def tokenize_unpaired(record, template, tokenizer, max_source_length, max_target_length, system_prompt=None):
    """One normalised KTO record -> its examples: [{"prompt_ids", "completion_ids", "label", "truncated"}, ...]
    (two for a preference pair: the chosen answer desirable, the rejected one undesirable). "truncated" (the prompt
    or an answer was cut) counts records: it is set on a record's first example only."""
    paired = record.get("rejected") is not None
    pair = {**record, "chosen": record["completion"], "rejected": record["rejected"] if paired else ""}
    ids = tokenize_preference(pair, template, tokenizer, max_source_length, max_target_length, system_prompt)
    answers = [(ids["chosen_ids"], record["label"])]
    if paired:
        answers.append((ids["rejected_ids"], False))
    examples = []
    for index, (answer_ids, label) in enumerate(answers):
        truncated = ids["truncated"] and index == 0
        examples.append(
            {"prompt_ids": ids["prompt_ids"], "completion_ids": answer_ids, "label": label, "truncated": truncated}
        )
    return examples


def prepare_unpaired_dataset(
    dataset, template, tokenizer, max_source_length, max_target_length, system_prompt=None, num_proc=None, desc=""
):
    """Dataset of normalised KTO records -> {"prompt_ids", "completion_ids", "label"}, one row per judged answer.
    None (a split not asked for) gives None."""
    if dataset is None:
        return None
    lengths = (max_source_length, max_target_length)

    def tokenize(batch):  # batched: a pair gives two rows
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples = []
        for row in rows:
            examples += tokenize_unpaired(row, template, tokenizer, *lengths, system_prompt)
        return {column: [example[column] for example in examples] for column in COLUMNS}

    dataset = dataset.map(
        tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Tokenising KTO examples{desc}",
    )
    truncated = sum(dataset["truncated"])
    if truncated:
        logger.warning(
            "%d records were truncated to --max_source_length %d / --max_target_length %d tokens.",
            truncated,
            max_source_length,
            max_target_length,
        )
    return dataset.remove_columns("truncated")


def log_class_balance(dataset, desirable_weight, undesirable_weight):
    """Log how many desirable and undesirable examples there are and whether the weights balance them as the KTO
    paper advises: desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3] (its Eq. 8)."""
    desirable = sum(dataset["label"])
    undesirable = len(dataset) - desirable
    logger.info(
        "KTO examples: %d desirable, %d undesirable (--desirable_weight %g, --undesirable_weight %g).",
        desirable,
        undesirable,
        desirable_weight,
        undesirable_weight,
    )
    if not desirable or not undesirable:
        only = "desirable" if desirable else "undesirable"
        logger.warning("Every KTO example is %s: KTO can only raise (or only lower) their likelihood.", only)
        return
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if not 1 <= ratio <= 4 / 3:
        low = undesirable_weight * undesirable / desirable
        logger.warning(
            "Weighted desirable : undesirable is %.2f; the KTO paper advises 1 to 1.33. With these counts, pass "
            "--desirable_weight between %.2f and %.2f (or change --undesirable_weight).",
            ratio,
            low,
            low * 4 / 3,
        )
