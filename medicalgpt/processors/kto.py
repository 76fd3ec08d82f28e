"""KTO records -> token ids: one example per judged answer, {"prompt_ids", "completion_ids", "label"}.

The prompt and the answer are tokenised exactly as DPO tokenises a pair (`tokenize_preference`: the template's
rendering of the context up to the generation prompt, the answer ending with the template's stop token, the prompt's
last `max_source_length` tokens and the answer's first `max_target_length`), so SFT, DPO and KTO see one format. A
preference pair gives two examples: its chosen answer (label true) and its rejected answer (label false).

trl's KTOTrainer estimates the KL term from mismatched (prompt, answer) pairs within each batch and so reads the
training data in order: the examples are shuffled here (with the run's seed), or a file sorted by label would give
batches of one class, and a split pair's two answers would sit side by side.
"""

import logging

from medicalgpt.train.preprocess import tokenize_preference
from medicalgpt.train.records import load_stage_records

logger = logging.getLogger("medicalgpt")

COLUMNS = ("prompt_ids", "completion_ids", "label", "truncated")


def tokenize_unpaired(record, template, tokenizer, max_source_length, max_target_length, system_prompt=None):
    """One normalised KTO record -> its examples: [{"prompt_ids", "completion_ids", "label", "truncated"}, ...]
    (two for a preference pair: the chosen answer desirable, the rejected one undesirable)."""
    paired = record.get("rejected") is not None
    pair = {**record, "chosen": record["completion"], "rejected": record["rejected"] if paired else ""}
    ids = tokenize_preference(pair, template, tokenizer, max_source_length, max_target_length, system_prompt)
    answers = [(ids["chosen_ids"], record["label"])] + ([(ids["rejected_ids"], False)] if paired else [])
    return [
        # "truncated" (the prompt or an answer was cut) counts records: it is set on a record's first example only
        {"prompt_ids": ids["prompt_ids"], "completion_ids": answer_ids, "label": label,
         "truncated": ids["truncated"] and index == 0}
        for index, (answer_ids, label) in enumerate(answers)
    ]  # fmt: skip


def prepare_unpaired_dataset(
    dataset, template, tokenizer, max_source_length, max_target_length, system_prompt=None, num_proc=None, desc=""
):
    """Dataset of normalised KTO records -> {"prompt_ids", "completion_ids", "label"}, one row per judged answer.
    None (a split not asked for) gives None."""
    if dataset is None:
        return None

    def tokenize(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples = [
            example
            for row in rows
            for example in tokenize_unpaired(row, template, tokenizer, max_source_length, max_target_length,
                                             system_prompt)
        ]  # fmt: skip
        return {column: [example[column] for example in examples] for column in COLUMNS}

    dataset = dataset.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
        desc=f"Tokenising KTO examples{desc}",
    )  # fmt: skip
    truncated = sum(dataset["truncated"])
    if truncated:
        logger.warning(
            "%d records were truncated to --max_source_length %d / --max_target_length %d tokens.",
            truncated, max_source_length, max_target_length,
        )  # fmt: skip
    return dataset.remove_columns("truncated")


def load_tokenized_unpaired(data_args, training_args, pref_args, tokenizer):
    """Validated KTO records (and preference pairs) -> tokenised (train, eval) datasets; the training examples
    shuffled with --seed (see the module docstring) and their class balance logged."""
    from medicalgpt.templates import build_template

    train_records, eval_records = load_stage_records(data_args, training_args, stage="kto")
    template = build_template(data_args.template_name, tokenizer)
    splits = []
    with training_args.main_process_first(desc="tokenising"):
        for split, records in (("train", train_records), ("eval", eval_records)):
            splits.append(prepare_unpaired_dataset(
                records, template, tokenizer, pref_args.max_source_length, pref_args.max_target_length,
                data_args.system_prompt, data_args.preprocessing_num_workers, f" ({split})",
            ))  # fmt: skip
    train, evaluation = splits
    if train is not None:
        train = train.shuffle(seed=training_args.seed).flatten_indices()
        log_class_balance(train, training_args.desirable_weight, training_args.undesirable_weight)
    return train, evaluation


def log_class_balance(dataset, desirable_weight, undesirable_weight):
    """Log how many desirable and undesirable examples there are and whether the weights balance them as the KTO
    paper advises: desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3] (its Eq. 8)."""
    desirable = sum(dataset["label"])
    undesirable = len(dataset) - desirable
    logger.info(
        "KTO examples: %d desirable, %d undesirable (--desirable_weight %g, --undesirable_weight %g).",
        desirable, undesirable, desirable_weight, undesirable_weight,
    )  # fmt: skip
    if not desirable or not undesirable:
        logger.warning("Every KTO example is %s: KTO learns only to raise (or lower) them.",
                       "desirable" if desirable else "undesirable")  # fmt: skip
        return
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if not 1 <= ratio <= 4 / 3:
        low, high = undesirable_weight * undesirable / desirable, undesirable_weight * undesirable / desirable * 4 / 3
        logger.warning(
            "Weighted desirable : undesirable is %.2f; the KTO paper advises 1 to 1.33. With these counts, pass "
            "--desirable_weight between %.2f and %.2f (or change --undesirable_weight).",
            ratio, low, high,
        )  # fmt: skip
