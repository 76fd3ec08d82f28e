"""The run around a trainer: the sharding device checked and the arguments logged, where to resume, a finished run
recognised, the process group left cleanly."""

import json
import logging
import os

from torch.nn.parallel import DistributedDataParallel
from transformers.trainer_utils import get_last_checkpoint

from medicalgpt.device import describe_choice
from medicalgpt.errors import UsageError

logger = logging.getLogger("medicalgpt")


def check_and_log_args(training_args, model_args, lora_args=None):
    """Check that the run can go on this device, then log the effective arguments once. Nothing is changed: flags
    that depend on each other were reconciled by the parser (medicalgpt/parser.py `ALIASES`, `DERIVED`)."""
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
            "or pass --overwrite_output_dir to start again.",
            training_args.output_dir,
        )
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


def end_training(accelerator, *wrapped_models):
    """Finish the trackers and leave the process group, freeing DDP's reducers first. Freed later, when main()
    returns, a reducer can drop the last reference to the gloo group with the GIL held; the group's destructor then
    waits forever for a worker thread that needs the GIL (pytorch/pytorch#56297), and torchrun never exits."""
    for model in wrapped_models:
        if isinstance(model, DistributedDataParallel):
            del model.reducer, model.logger
    accelerator.end_training()
