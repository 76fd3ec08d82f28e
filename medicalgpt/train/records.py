"""Training records from files or the hub: validated, normalised and written to an Arrow file on disk as they are
read (never held as a Python list of all of them), under a hash of their content, then split and limited.

A records folder in the datasets cache (`HF_DATASETS_CACHE/medicalgpt/records-<hash>`) holds `records.arrow` and
`summary.json`. The hash covers the input files' bytes (or a hub split's fingerprint), the stage and
--skip_invalid_examples, so a second run on the same data skips validation and the tokenising `.map`s, cached beside
the records, are reused. A folder is written under a staging name and moved into place whole: invalid data
(a DataValidationError) or a crash leaves nothing behind.
"""

import hashlib
import itertools
import json
import logging
import os
import shutil

import datasets
import pyarrow as pa

from medicalgpt.data.files import find_data_files
from medicalgpt.data.validate import FileReport, check_reports, check_usable, iter_file_records, iter_row_records
from medicalgpt.errors import UsageError
from medicalgpt.templates import build_template

logger = logging.getLogger("medicalgpt")

CACHE_VERSION = "2"  # part of every records hash: bump it when validation or the record shape changes
WRITE_BATCH = 1000  # records per Arrow record batch: memory while writing is one batch
RECORDS_FILE = "records.arrow"
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_STRING = datasets.Value("string")
FEATURES = {  # the normalised record of each stage (medicalgpt.data.shapes), as Arrow columns
    "pt": datasets.Features({"text": _STRING, "source": _STRING}),
    "sft": datasets.Features({"messages": _MESSAGES, "system": _STRING, "tools": _STRING, "source": _STRING}),
    "preference": datasets.Features(
        {
            "messages": _MESSAGES,
            "system": _STRING,
            "tools": _STRING,
            "chosen": _STRING,
            "rejected": _STRING,
            "source": _STRING,
        }
    ),
    "kto": datasets.Features(
        {
            "messages": _MESSAGES,
            "system": _STRING,
            "tools": _STRING,
            "completion": _STRING,
            "label": datasets.Value("bool"),
            "rejected": _STRING,
            "source": _STRING,
        }
    ),
}


def load_stage_records(data_args, training_args, stage):
    """Validated, normalised (train, eval) records as memory-mapped datasets; eval is None when not evaluating."""
    skip = data_args.skip_invalid_examples
    train = evaluation = None
    with training_args.main_process_first(desc="validating records"):  # rank 0 writes, the others reuse
        if data_args.dataset_name:
            splits = load_hub_records(data_args, stage)
            train, evaluation = splits.get("train"), splits.get("validation")
        if data_args.train_file_dir:
            files = find_data_files(data_args.train_file_dir, stage)
            train = _concat(train, load_file_records(files, stage, skip, data_args.overwrite_cache))
        if training_args.do_eval and data_args.validation_file_dir:
            files = find_data_files(data_args.validation_file_dir, stage)
            evaluation = _concat(evaluation, load_file_records(files, stage, skip, data_args.overwrite_cache))
    if train is None and training_args.do_train:
        raise UsageError("No training data: pass --train_file_dir or --dataset_name.")
    if training_args.do_eval and evaluation is None and train:
        held_out = max(1, len(train) * data_args.validation_split_percentage // 100)
        logger.info(
            "No validation data given: holding out %d of %d training records for evaluation.", held_out, len(train)
        )
        train, evaluation = train.select(range(held_out, len(train))), train.select(range(held_out))
    train = _take(train, data_args.max_train_samples)
    evaluation = _take(evaluation, data_args.max_eval_samples) if training_args.do_eval else None
    logger.info("Records: %d for training, %d for evaluation.", len(train or []), len(evaluation or []))
    return train, evaluation


def load_file_records(files, stage, skip_invalid=False, overwrite=False):
    """Data files -> their validated, normalised records as a memory-mapped dataset, cached by content (see the
    module docstring). Errors raise DataValidationError (every one, `path:line`) unless skip_invalid."""
    digest = hashlib.sha256(f"{CACHE_VERSION}|{stage}|{bool(skip_invalid)}".encode())
    for path in files:
        digest.update(f"|{path}|{os.path.getsize(path)}|".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    reports = [FileReport(path) for path in files]
    records = itertools.chain.from_iterable(iter_file_records(report, stage) for report in reports)
    return _cached_records(digest.hexdigest()[:20], records, reports, stage, skip_invalid, overwrite)


def load_hub_records(data_args, stage):
    """Every split of --dataset_name, validated (errors name `dataset[split]:row`) and cached by its fingerprint."""
    raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    splits = {}
    for split, rows in raw.items():
        name = f"{data_args.dataset_name}[{split}]"
        key = f"{CACHE_VERSION}|{stage}|{data_args.skip_invalid_examples}|{name}|{rows._fingerprint}"
        report = FileReport(name)
        records = iter_row_records(report, rows, stage)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        splits[split] = _cached_records(
            digest, records, [report], stage, data_args.skip_invalid_examples, data_args.overwrite_cache
        )
    return splits


def _cached_records(digest, records, reports, stage, skip_invalid, overwrite):
    """The records folder named by `digest`: reused when it exists, else written from the `records` generator,
    whose validation fills `reports`; checked (raise or log) before the folder is moved into place."""
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "medicalgpt", f"records-{digest}")
    if overwrite and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the other ranks reuse what rank 0 rewrote
        shutil.rmtree(folder, ignore_errors=True)
    if os.path.isdir(folder):
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        logger.info(
            "Validated records reused from %s: %d records (%d skipped as invalid, %d warnings when validated).",
            folder,
            summary["records"],
            summary["skipped"],
            summary["warnings"],
        )
        return datasets.Dataset.from_file(os.path.join(folder, RECORDS_FILE))
    staging = f"{folder}.partial-{os.getpid()}"
    try:
        os.makedirs(staging)
        written = write_arrow(records, FEATURES[stage], os.path.join(staging, RECORDS_FILE))
        skipped = check_reports(reports, skip_invalid)
        check_usable(reports)
        summary = {"records": written, "skipped": skipped, "warnings": sum(len(r.warnings) for r in reports)}
        with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({**summary, "files": [report.path for report in reports]}, f, ensure_ascii=False)
        os.replace(staging, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
        logger.info("%s was written meanwhile by another process: using it.", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.Dataset.from_file(os.path.join(folder, RECORDS_FILE))


def write_arrow(records, features, path):
    """Write the `records` iterable to an Arrow stream file (the format `datasets.Dataset.from_file` maps) in batches
    of WRITE_BATCH; returns how many were written."""
    schema, written, records = features.arrow_schema, 0, iter(records)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in iter(lambda: list(itertools.islice(records, WRITE_BATCH)), []):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            written += len(batch)
    return written


def _concat(first, second):
    return second if first is None else datasets.concatenate_datasets([first, second])


def _take(records, limit):
    return records.select(range(min(limit, len(records)))) if records is not None and limit is not None else records


def cache_records(records, overwrite=False):
    """A list of normalised records -> datasets.Dataset, saved once in the datasets cache under a hash of its content
    (for records built in memory, e.g. by tests; files are streamed by `load_file_records`). `overwrite`
    (--overwrite_cache) rewrites the folder, dropping the tokenising maps cached beside it."""
    if not records:
        return None if records is None else datasets.Dataset.from_list(records)
    content = json.dumps(records, ensure_ascii=False, sort_keys=True, default=str)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:20]
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "medicalgpt", f"list-{digest}")
    if overwrite and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.isdir(folder):
        staging = f"{folder}.partial-{os.getpid()}"
        datasets.Dataset.from_list(records).save_to_disk(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # written meanwhile by another process: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(folder)


def load_tokenized_preferences(data_args, training_args, pref_args, tokenizer):
    """Validated preference records -> tokenised (train, eval) datasets of prompt_ids / chosen_ids / rejected_ids."""
    from medicalgpt.processors.preference import prepare_preference_dataset

    train_records, eval_records = load_stage_records(data_args, training_args, stage="preference")
    template = build_template(data_args.template_name, tokenizer)
    with training_args.main_process_first(desc="tokenising"):
        return tuple(
            None
            if records is None
            else prepare_preference_dataset(
                records,
                template,
                tokenizer,
                pref_args.max_source_length,
                pref_args.max_target_length,
                data_args.system_prompt,
                data_args.preprocessing_num_workers,
                f" ({split})",
            )
            for split, records in (("train", train_records), ("eval", eval_records))
        )


def load_tokenized_unpaired(data_args, training_args, pref_args, tokenizer):
    """Validated KTO records (and preference pairs) -> tokenised (train, eval) datasets of prompt_ids /
    completion_ids / label; the training examples shuffled once with --seed (trl's KTOTrainer reads them in order:
    medicalgpt/processors/kto.py) and their class balance logged."""
    from medicalgpt.processors.kto import log_class_balance, prepare_unpaired_dataset

    train_records, eval_records = load_stage_records(data_args, training_args, stage="kto")
    template = build_template(data_args.template_name, tokenizer)
    lengths = (pref_args.max_source_length, pref_args.max_target_length)
    splits = []
    with training_args.main_process_first(desc="tokenising"):
        for split, records in (("train", train_records), ("eval", eval_records)):
            options = dict(system_prompt=data_args.system_prompt, num_proc=data_args.preprocessing_num_workers)
            splits.append(
                prepare_unpaired_dataset(records, template, tokenizer, *lengths, **options, desc=f" ({split})")
            )
    train, evaluation = splits
    if train is not None:
        train = train.shuffle(seed=training_args.seed).flatten_indices()
        log_class_balance(train, training_args.desirable_weight, training_args.undesirable_weight)
    return train, evaluation
