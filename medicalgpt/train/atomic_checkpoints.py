"""Checkpoints that appear whole or not at all."""

import logging
import os
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from medicalgpt.precision import SaveInOutputDtype

logger = logging.getLogger("medicalgpt")


def with_atomic_checkpoints(trainer_class):
    """`trainer_class` whose checkpoints appear whole or not at all: each is written into <run dir>/.partial and
    renamed into place once complete, so a run killed while saving (SIGKILL, OOM) resumes from the previous one.

    Written against transformers 5.23, whose `Trainer._save_checkpoint` takes every path (the checkpoint folder,
    the best-checkpoint check, rotation) from `_get_output_dir(trial)`: that method points into the staging folder
    during a save, and `args.output_dir` is never changed. The best checkpoint recorded while staging is then
    mapped to its final place before the checkpoint's trainer_state.json is rewritten and the folder renamed, so
    --load_best_model_at_end finds it and --save_total_limit rotation never deletes it
    (tests/train/test_scaleout.py). The final save_model() writes the weights in the dtype medicalgpt/precision.py
    chose (SaveInOutputDtype)."""

    class AtomicCheckpointTrainer(SaveInOutputDtype, trainer_class):
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
                remove_whole(os.path.join(run_dir, name))
                os.replace(os.path.join(staging, name), os.path.join(run_dir, name))
                rotate_whole_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
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


def remove_whole(folder):
    """Delete `folder` in one step as far as a reader can tell: it is renamed into the run's .partial folder
    (atomic), then deleted there. Deleted in place, a run killed midway (SIGKILL while rotating) left a checkpoint
    folder without its trainer_state.json where resuming looks."""
    if not os.path.isdir(folder):
        return
    staging = os.path.join(os.path.dirname(folder), ".partial")
    os.makedirs(staging, exist_ok=True)
    doomed = os.path.join(staging, f"deleting-{os.path.basename(folder)}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_whole_checkpoints(run_dir, save_total_limit, best_model_checkpoint=None):
    """transformers' `rotate_checkpoints` (5.23: keep the newest and the best, delete the oldest others down to
    `save_total_limit`) with each deletion whole (`remove_whole`)."""
    checkpoints = sort_checkpoints(run_dir)
    if not save_total_limit or save_total_limit <= 0 or len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]} | ({str(Path(best_model_checkpoint))} if best_model_checkpoint else set())
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    for checkpoint in [path for path in checkpoints if path not in protected][: max(excess, 0)]:
        remove_whole(checkpoint)
