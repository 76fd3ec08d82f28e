"""--streaming True: records read, validated, tokenised and packed as training consumes them, never written whole.

For a corpus too large to write to disk once more (a 10 GB text file, a hub dataset of millions of records): PT and
SFT get a `datasets.IterableDataset`. The Trainer cannot know its length, so --max_steps is required.
- Local files are validated first in one pass that keeps no record (~60,000 records/s): every error is reported as
  `path:line` and counted before the model loads, exactly as without --streaming; the stream then yields the valid
  records. No eval split is held out of a stream: give --validation_file_dir (or a hub `validation` split).
- A hub dataset (--dataset_name) is streamed from the hub and validated as it is read: an invalid row stops the run
  with `dataset[split]:row`, or is skipped and counted with --skip_invalid_examples.
- Tokenisation is the same code as without --streaming (medicalgpt.processors), batch by batch: PT documents
  are grouped into --block_size blocks per STREAM_BATCH documents (the same blocks as the cached path); SFT
  conversations are packed on the fly (best fit decreasing within each STREAM_BATCH conversations, trl's
  `pack_dataset`) when --packing says rows. Conversations cut or skipped to fit --model_max_length are counted and
  the totals logged every LOG_EVERY conversations.
- Under torchrun the ranks share one stream record by record, whatever the number and sizes of the files (see
  stream_file_records): each record once per pass across ranks, every rank the same number of steps; a pass's last
  global batch, when short, is completed with the pass's first records (accelerate's even_batches).
"""

import logging

import datasets
from trl.data_utils import pack_dataset

from medicalgpt.data.files import find_data_files
from medicalgpt.data.validate import FileReport, check_reports, check_usable, iter_file_records, iter_row_records
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.train.records import FEATURES

logger = logging.getLogger("medicalgpt")

STREAM_BATCH = 1000  # records tokenised (and conversations packed) together; the PT grouping batch too
LOG_EVERY = 10_000  # streamed conversations between two logs of the overlong counts


def check_streaming_args(data_args, training_args):
    """What a stream needs, said before any data is read."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise UsageError(
            "--streaming True needs --max_steps: a stream has no length, so the number of training steps cannot "
            "follow from --num_train_epochs."
        )
    if training_args.do_eval and not (data_args.validation_file_dir or data_args.dataset_name):
        raise UsageError(
            "--streaming True with --do_eval needs --validation_file_dir: no split is held out of a stream."
        )


def stream_stage_records(data_args, training_args, stage):
    """(train, eval) IterableDatasets of normalised records; eval None when not evaluating or not given."""
    check_streaming_args(data_args, training_args)
    skip = data_args.skip_invalid_examples
    train = evaluation = None
    if data_args.dataset_name:
        train = _stream_hub_split(data_args, "train", stage)
        evaluation = _stream_hub_split(data_args, "validation", stage) if training_args.do_eval else None
    if data_args.train_file_dir:
        train = stream_file_records(find_data_files(data_args.train_file_dir, stage), stage, skip)
    if training_args.do_eval and data_args.validation_file_dir:
        evaluation = stream_file_records(find_data_files(data_args.validation_file_dir, stage), stage, skip)
    if train is None and training_args.do_train:
        raise UsageError("No training data: pass --train_file_dir or --dataset_name.")
    if train is not None and data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.take(data_args.max_eval_samples)
    logger.info("Streaming records (--streaming): training for --max_steps %d.", training_args.max_steps)
    return train, evaluation


def stream_file_records(files, stage, skip_invalid=False):
    """Validate `files` in one pass that keeps no record (errors raise or are logged as without streaming), then
    stream their valid records."""
    reports = [FileReport(path) for path in files]
    for report in reports:
        for _ in iter_file_records(report, stage):
            pass
    skipped = check_reports(reports, skip_invalid)
    check_usable(reports)
    logger.info("Validated %d records to stream (%d skipped).", sum(r.valid for r in reports), skipped)
    # The files as a tuple: one stream, not one shard per file (datasets shards a generator over its list
    # arguments). Sharded by file, accelerate gave each rank its own files (when there were at least as many files
    # as ranks): uneven files were read unevenly, and a rank whose files yielded nothing stopped while the others
    # waited for it. One shard makes accelerate divide records instead, whatever the files: with trl's
    # dispatch_batches=False (SFT) every rank reads the stream and keeps its slice of each global batch; with the
    # Trainer's default dispatch (PT) rank 0 reads and sends each rank its share. Every rank steps the same number
    # of times, and each record is seen once per pass across ranks, except that a short last global batch is
    # completed with the pass's first records (accelerate's even_batches; tests/train/test_streaming.py).
    return datasets.IterableDataset.from_generator(
        _file_records, gen_kwargs={"files": tuple(files), "stage": stage}, features=FEATURES[stage]
    )


def _file_records(files, stage):
    for path in files:  # the invalid records were reported by the first pass
        yield from iter_file_records(FileReport(path), stage)


def _stream_hub_split(data_args, split, stage):
    options = {"name": data_args.dataset_name, "config": data_args.dataset_config_name, "split": split}
    return datasets.IterableDataset.from_generator(
        _hub_records,
        gen_kwargs={**options, "stage": stage, "skip_invalid": data_args.skip_invalid_examples},
        features=FEATURES[stage],
    )


def _hub_records(name, config, split, stage, skip_invalid):
    """A hub split streamed and validated row by row: an invalid row raises DataValidationError (`name[split]:row`)
    unless skip_invalid, which counts it."""
    report = FileReport(f"{name}[{split}]")
    rows = datasets.load_dataset(name, config, split=split, streaming=True)
    for record in iter_row_records(report, rows, stage):
        if report.errors and not skip_invalid:
            raise DataValidationError(report.errors)
        yield record
    check_reports([report], skip_invalid)


class OverlongCounter:
    """Counts the streamed conversations cut, shortened or skipped to fit --model_max_length (as a batched filter
    that drops the skipped ones) and logs the totals every LOG_EVERY conversations."""

    def __init__(self, max_length):
        self.max_length, self.seen, self.truncated, self.shortened, self.skipped = max_length, 0, 0, 0, 0

    def __call__(self, input_ids, dropped_turns, truncated):
        keep = [len(ids) > 0 for ids in input_ids]
        self.truncated += sum(truncated)
        self.shortened += sum(1 for n, kept in zip(dropped_turns, keep) if n and kept)
        self.skipped += keep.count(False)
        before, self.seen = self.seen, self.seen + len(keep)
        if self.seen // LOG_EVERY > before // LOG_EVERY and (self.truncated or self.shortened or self.skipped):
            logger.warning(
                "Streamed %d conversations: %d truncated, %d lost later turns, %d skipped to fit model_max_length=%d.",
                self.seen,
                self.truncated,
                self.shortened,
                self.skipped,
                self.max_length,
            )
        return keep


def finish_sft_stream(dataset, max_length, pack=False):
    """Tokenised SFT stream (medicalgpt.processors.sft.prepare_sft_dataset) -> {"input_ids", "labels"} with the
    skipped conversations dropped and counted; packed into rows of up to `max_length` tokens with their
    `seq_lengths` (trl's best fit decreasing, per STREAM_BATCH conversations) when `pack`."""
    counter = OverlongCounter(max_length)
    columns = ["input_ids", "dropped_turns", "truncated"]
    dataset = dataset.filter(counter, input_columns=columns, batched=True, batch_size=STREAM_BATCH)
    dataset = dataset.select_columns(["input_ids", "labels"])
    if pack:
        dataset = pack_dataset(dataset, max_length, "bfd", {"batch_size": STREAM_BATCH})
    return dataset
