"""The run around a trainer: the sharding device checked, the arguments logged and the generators seeded before,
the process group left cleanly after. Where a run resumes is medicalgpt/train/resume.py."""

import logging
import os

from torch.nn.parallel import DistributedDataParallel
from transformers import set_seed

from medicalgpt.device import describe_choice
from medicalgpt.errors import UsageError
from medicalgpt.model.loader import MODEL_FLAG, check_paths
from medicalgpt.train.resume import find_resume_checkpoint

logger = logging.getLogger("medicalgpt")


def check_and_log_args(training_args, model_args, lora_args=None):
    """Check that the run can go on this device and that its model paths exist, before anything is printed; then
    log the effective arguments at debug level (--verbose; the run summary writes them to output_dir/run_args.json,
    medicalgpt/train/run_summary.py). No argument is changed: flags that depend on each other were reconciled by the
    parser (medicalgpt/parser.py `ALIASES`, `DERIVED`). Last, every random generator is seeded with --seed, so what
    is built before the Trainer seeds them (LoRA's initial weights, a reward model's new head) is the same in every
    run of the same arguments, as transformers' own example scripts do it."""
    check_sharding_device(training_args)
    tokenizer = model_args.tokenizer_name_or_path
    for path, flag in ((model_args.model_name_or_path, MODEL_FLAG), (tokenizer, "--tokenizer_name_or_path")):
        if path:
            check_paths(model_args, path, flag)
    logger.debug(describe_choice(training_args))
    logger.debug("Model arguments: %s", model_args)
    if lora_args is not None:
        logger.debug("LoRA arguments: %s", lora_args)
    logger.debug("Training arguments: %s", training_args.to_json_string())
    set_seed(training_args.seed)


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


def end_training(accelerator, *wrapped_models):
    """Wait for every rank, finish the trackers and leave the process group, freeing DDP's reducers first.

    Ranks leave together: a rank that has nothing to save (all but the main one) would otherwise exit while the main
    one still writes, and its interpreter could shut down before the gloo worker thread had released the last
    collective's tensors; that thread then needs the GIL of a finalizing interpreter and the process aborts
    ("terminate called without an active exception", seen under load on torch 2.13 with torchrun).
    Freed later, when main() returns, a reducer can drop the last reference to the gloo group with the GIL held; the
    group's destructor then waits forever for a worker thread that needs the GIL (pytorch/pytorch#56297), and torchrun
    never exits."""
    accelerator.wait_for_everyone()
    for model in wrapped_models:
        if isinstance(model, DistributedDataParallel):
            del model.reducer, model.logger
    accelerator.end_training()


def train_and_evaluate(trainer, training_args, eval_extras=None, can_evaluate=True):
    """The end of every training script: --do_train trains (resuming from --resume_from_checkpoint, or the latest
    checkpoint in --output_dir), saves the model, metrics and trainer state; --do_eval evaluates when there is
    something to evaluate (`eval_extras(metrics)` adds figures, e.g. PT's perplexity); then every rank leaves
    together."""
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval and can_evaluate:
        metrics = trainer.evaluate()
        metrics.update(eval_extras(metrics) if eval_extras else {})
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    end_training(trainer.accelerator, trainer.model_wrapped)
    logger.info("Outputs in %s", training_args.output_dir)
