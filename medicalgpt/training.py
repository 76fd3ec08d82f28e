"""What every training script does around its trainer: logging, argument fix-ups, data loading, resuming."""

import hashlib
import json
import logging
import os
import shutil
import sys

import datasets
import transformers
from torch.nn.parallel import DistributedDataParallel
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from medicalgpt.data import DataValidationError, find_data_files, load_records
from medicalgpt.device import describe_choice
from medicalgpt.readers import InputNotFoundError

logger = logging.getLogger("medicalgpt")


class UsageError(ValueError):
    """A command line that cannot work (missing data, conflicting flags): reported without a traceback."""


def run_cli(main):
    """Run a script's main(); the user's mistakes (bad data, bad flags, a named file or folder that is missing) end
    with their one-line message and exit status 1. Any other exception, a FileNotFoundError from the program's own
    files included, is a bug and keeps its traceback."""
    try:
        main()
    except (DataValidationError, UsageError, InputNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def setup_logging(training_args):
    """English logs through `logging`: ours at INFO from the main process, warnings only from the others.
    `--log_level` sets both ours and the libraries' (which stay at WARNING otherwise)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    explicit = training_args.log_level if training_args.should_log else training_args.log_level_replica
    explicit = None if explicit == "passive" else transformers.utils.logging.log_levels[explicit]
    ours = explicit or (logging.INFO if training_args.should_log else logging.WARNING)
    for name in ("medicalgpt", "template"):
        logging.getLogger(name).setLevel(ours)
    libraries = explicit or logging.WARNING
    datasets.utils.logging.set_verbosity(libraries)
    transformers.utils.logging.set_verbosity(libraries)


def prepare_args(training_args, model_args, lora_args=None):
    """Reconcile flags that depend on each other, then log the effective arguments once."""
    if lora_args is not None and lora_args.qlora:
        model_args.load_in_4bit = True
        lora_args.use_peft = True
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and under DDP without extra flags.
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    check_sharding_device(training_args)
    logger.info(describe_choice(training_args))
    logger.info("Model arguments: %s", model_args)
    if lora_args is not None:
        logger.info("LoRA arguments: %s", lora_args)
    logger.info("Training arguments: %s", training_args.to_json_string())


def check_sharding_device(training_args):
    """DeepSpeed and FSDP through accelerate 1.15 need accelerator devices. On CPU processes (`use_cpu`, the default
    without a GPU) accelerate skips DeepSpeed, after transformers has already ZeRO-3-partitioned the model at load,
    and ignores FSDP, training plain DDP without a word. Said before any model loads."""
    if not training_args.use_cpu:
        return
    deepspeed = training_args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if deepspeed or fsdp:
        name = "--deepspeed" if deepspeed else "--fsdp"
        raise UsageError(
            f"{name} (or an accelerate config that asks for it) needs GPUs: on CPU processes accelerate would run "
            "plain data parallel instead. Leave it out (torchrun alone is data parallel on CPU), or run on GPUs."
        )


def find_resume_checkpoint(training_args):
    """The checkpoint to resume from: --resume_from_checkpoint, else the last one in output_dir (unless
    --overwrite_output_dir). When output_dir holds a finished run (its final trainer_state.json, written after the
    model was saved) whose step budget has not grown, the run is complete: it says so and exits 0 (SystemExit)
    before training, leaving output_dir as it is."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if getattr(training_args, "overwrite_output_dir", False) or not os.path.isdir(training_args.output_dir):
        return None
    if _run_is_complete(training_args.output_dir, training_args):
        logger.warning(
            "%s: this run is complete; nothing to train. Raise --max_steps / --num_train_epochs to train further, "
            "or pass --overwrite_output_dir to start again.", training_args.output_dir,
        )  # fmt: skip
        raise SystemExit(0)
    checkpoint = get_last_checkpoint(training_args.output_dir)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    return checkpoint


def _run_is_complete(output_dir, training_args):
    """Whether the run in `output_dir` reached its step budget and the budget asked for now is not larger:
    --max_steps when given, else the budget the run computed (trainer_state.json `max_steps`) at no more epochs than
    now. PPO's own final state records no budget (it is --total_episodes): PPO resumes from its last checkpoint, and
    a budget that has not grown leaves nothing to train."""
    try:
        with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    step = state.get("global_step") or 0
    if "max_steps" not in state or "num_train_epochs" not in state:  # not a transformers TrainerState: PPO's own
        return False
    if training_args.max_steps > 0:
        return step >= training_args.max_steps
    epochs_grew = training_args.num_train_epochs > state["num_train_epochs"]
    return bool(state.get("max_steps")) and step >= state["max_steps"] and not epochs_grew


def load_hub_records(data_args, stage):
    from medicalgpt.data import normalize_rows

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


def build_template(template_name, tokenizer):
    """--template_name from template.py, else the tokenizer's own chat template; a usage error when neither works."""
    from template import get_conv_template, template_from_tokenizer

    try:
        return get_conv_template(template_name) if template_name else template_from_tokenizer(tokenizer)
    except ValueError as error:
        raise UsageError(str(error)) from error


def prepare_preference_data(data_args, training_args, pref_args, tokenizer):
    """Validated preference records -> tokenised (train, eval) datasets of prompt_ids / chosen_ids / rejected_ids."""
    from medicalgpt.preprocess import prepare_preference_dataset

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


def end_training(accelerator, *wrapped_models):
    """Finish the trackers and leave the process group, freeing DDP's reducers first. Freed later, when main()
    returns, a reducer can drop the last reference to the gloo group with the GIL held; the group's destructor then
    waits forever for a worker thread that needs the GIL (pytorch/pytorch#56297), and torchrun never exits."""
    for model in wrapped_models:
        if isinstance(model, DistributedDataParallel):
            del model.reducer, model.logger
    accelerator.end_training()


def with_atomic_checkpoints(trainer_class):
    """`trainer_class` whose checkpoints appear whole or not at all: each is written into <run dir>/.partial and
    renamed into place once complete, so a run killed while saving (SIGKILL, OOM) resumes from the previous one.

    Written against transformers 5.23, whose `Trainer._save_checkpoint` takes every path (the checkpoint folder,
    the best-checkpoint check, rotation) from `_get_output_dir(trial)`: that method points into the staging folder
    during a save, and `args.output_dir` is never changed. The best checkpoint recorded while staging is then
    mapped to its final place before the checkpoint's trainer_state.json is rewritten and the folder renamed, so
    --load_best_model_at_end finds it and --save_total_limit rotation never deletes it (tests/test_scaleout.py)."""

    class AtomicCheckpointTrainer(trainer_class):
        _staging = False

        def _get_output_dir(self, trial):
            run_dir = super()._get_output_dir(trial)
            return os.path.join(run_dir, ".partial") if self._staging else run_dir

        def _save_checkpoint(self, model, trial):
            run_dir = self._get_output_dir(trial)
            staging, name = os.path.join(run_dir, ".partial"), f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            self._record_best_checkpoint(run_dir)
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
                os.replace(os.path.join(staging, name), os.path.join(run_dir, name))
                rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
            self.accelerator.wait_for_everyone()

        def _record_best_checkpoint(self, run_dir):
            """best_model_checkpoint in run_dir, not in the staging folder the Trainer saw during the save; as the
            Trainer does, only when that checkpoint exists (or is the one being saved)."""
            best = self.state.best_global_step
            folder = os.path.join(run_dir, f"checkpoint-{best}")
            if best and (best == self.state.global_step or os.path.isdir(folder)):
                self.state.best_model_checkpoint = folder

    AtomicCheckpointTrainer.__name__ = trainer_class.__name__
    return AtomicCheckpointTrainer
