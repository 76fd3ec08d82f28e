"""Where a run resumes: --resume_from_checkpoint, else the last checkpoint in output_dir; a finished run recognised
and left as it is."""

import json
import logging
import os

from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger("medicalgpt")


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
