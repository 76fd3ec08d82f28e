"""Training records from files or the hub: validated, split, and cached on disk as datasets under a content hash."""

import hashlib
import json
import logging
import os
import shutil

import datasets

from medicalgpt.cli import UsageError
from medicalgpt.data.validate import find_data_files, load_records, normalize_rows
from medicalgpt.templates import build_template

logger = logging.getLogger("medicalgpt")


def load_hub_records(data_args, stage):
    raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    return {split: normalize_rows(rows, stage, f"{data_args.dataset_name}[{split}]") for split, rows in raw.items()}


def load_stage_records(data_args, training_args, stage):
    """Validated, normalised (train, eval) records; eval is None when not evaluating."""
    skip = data_args.skip_invalid_examples
    train = evaluation = None
    if data_args.dataset_name:
        splits = load_hub_records(data_args, stage)
        train, evaluation = splits.get("train"), splits.get("validation")
    if data_args.train_file_dir:
        train = (train or []) + load_records(find_data_files(data_args.train_file_dir, stage), stage, skip)
    if training_args.do_eval and data_args.validation_file_dir:
        evaluation = (evaluation or []) + load_records(
            find_data_files(data_args.validation_file_dir, stage), stage, skip
        )
    if train is None and training_args.do_train:
        raise UsageError("No training data: pass --train_file_dir or --dataset_name.")
    if training_args.do_eval and evaluation is None and train:
        held_out = max(1, len(train) * data_args.validation_split_percentage // 100)
        logger.info(
            "No validation data given: holding out %d of %d training records for evaluation.", held_out, len(train)
        )
        train, evaluation = train[held_out:], train[:held_out]
    train = _take(train, data_args.max_train_samples)
    evaluation = _take(evaluation, data_args.max_eval_samples) if training_args.do_eval else None
    logger.info("Records: %d for training, %d for evaluation.", len(train or []), len(evaluation or []))
    return train, evaluation


def _take(records, limit):
    return records[:limit] if records is not None and limit is not None else records


def to_dataset(records, overwrite=False):
    """Normalised records -> datasets.Dataset (the `source` column is kept for error messages).

    The records are saved once in the datasets cache (`HF_DATASETS_CACHE`), in a folder named by a hash of their
    content, so the tokenising `.map`s that follow are cached beside them and reused by the next run on the same
    data. `overwrite` (--overwrite_cache) rewrites the folder, dropping those cached maps."""
    if not records:
        return None if records is None else datasets.Dataset.from_list(records)
    content = json.dumps(records, ensure_ascii=False, sort_keys=True, default=str)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:20]
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "medicalgpt", f"records-{digest}")
    if overwrite and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the other ranks reuse what rank 0 rewrote
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.isdir(folder):
        staging = f"{folder}.partial-{os.getpid()}"
        datasets.Dataset.from_list(records).save_to_disk(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # written meanwhile by another process: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(folder)


def prepare_preference_data(data_args, training_args, pref_args, tokenizer):
    """Validated preference records -> tokenised (train, eval) datasets of prompt_ids / chosen_ids / rejected_ids."""
    from medicalgpt.train.preprocess import prepare_preference_dataset

    train_records, eval_records = load_stage_records(data_args, training_args, stage="preference")
    template = build_template(data_args.template_name, tokenizer)
    with training_args.main_process_first(desc="tokenising"):
        return tuple(
            None if records is None else prepare_preference_dataset(
                to_dataset(records), template, tokenizer, pref_args.max_source_length, pref_args.max_target_length,
                data_args.system_prompt, data_args.preprocessing_num_workers, f" ({split})",
            )
            for split, records in (("train", train_records), ("eval", eval_records))
        )  # fmt: skip
