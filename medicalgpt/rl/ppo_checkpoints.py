"""PPO's checkpoints and final policy: atomic checkpoint-N folders (models, optimizer, scheduler, state) that resume
a run where it stopped, under DDP and DeepSpeed alike."""

import json
import logging
import os
import shutil

import torch

from medicalgpt.precision import state_dict_for_output, write_config_dtype
from medicalgpt.train.atomic_checkpoints import remove_whole, rotate_whole_checkpoints

logger = logging.getLogger("medicalgpt")

STATE_FILE = "trainer_state.json"


class PPOCheckpoints:
    """PPOTrainer's saving and loading (a mixin: it reads the trainer's config, accelerator, model, optimizer,
    scheduler, shaping, update and log_history)."""

    def save_checkpoint(self):
        """checkpoint-N with models, optimizer, scheduler and state; written to a temporary folder, then renamed,
        so an interrupted save never leaves a half-written checkpoint."""
        final = os.path.join(self.config.output_dir, f"checkpoint-{self.update}")
        partial = os.path.join(self.config.output_dir, ".partial", f"checkpoint-{self.update}")
        state = self.gathered_state()
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            for name in ("policy", "critic"):
                getattr(self.unwrapped, name).save_pretrained(os.path.join(partial, name), state_dict=state[name])
            if not self.deepspeed:
                torch.save(self.optimizer.state_dict(), os.path.join(partial, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(partial, "scheduler.pt"))
            self.write_state(partial)
        if self.deepspeed:  # every rank writes its optimizer shard (collective)
            self.accelerator.wait_for_everyone()
            self.model.save_checkpoint(os.path.join(partial, "deepspeed"), exclude_frozen_parameters=True)
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            remove_whole(final)
            os.replace(partial, final)
            rotate_whole_checkpoints(self.config.output_dir, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    def gathered_state(self):
        """Full policy and critic state dicts (collective: under DeepSpeed ZeRO-3 every rank must call it, and the
        shards are gathered; saving from rank 0 alone would hang or write empty tensors)."""
        self.accelerator.wait_for_everyone()
        state = self.accelerator.get_state_dict(self.model) or {}  # ZeRO-3: None but on rank 0, which saves
        return {
            name: {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            for name in ("policy", "critic")
        }

    def write_state(self, folder):
        state = {
            "global_step": self.update,
            "max_steps": self.num_updates,
            "log_history": self.log_history,
            "reward_shaping": self.shaping.state_dict(),
        }
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    def load_checkpoint(self, folder):
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.deepspeed:  # trained weights and this rank's optimizer shard
            self.model.load_checkpoint(os.path.join(folder, "deepspeed"), load_module_strict=False)
        for name in ("policy", "critic") if not self.deepspeed else ():
            model, saved = getattr(self.unwrapped, name), os.path.join(folder, name)
            if isinstance(model, PeftModel):
                set_peft_model_state_dict(model, load_file(os.path.join(saved, "adapter_model.safetensors")))
            else:
                model.load_state_dict(type(model).from_pretrained(saved).state_dict())
        if not self.deepspeed:
            self.optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
        self.scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        self.update, self.log_history = state["global_step"], state["log_history"]
        if "reward_shaping" in state:  # adaptive KL coefficient and running reward moments
            self.shaping.load_state_dict(state["reward_shaping"])
        logger.info("Resuming from %s (update %d of %d)", folder, self.update, self.num_updates)

    def save_model(self):
        """The final policy in output_dir: a LoRA adapter (or merged weights with --merge_policy) and the tokenizer;
        loadable by inference.py and merge_peft_adapter.py. Trainer's name, so the scripts end every trainer alike."""
        state = self.gathered_state()["policy"]
        if not self.accelerator.is_main_process:
            return
        policy = self.unwrapped.policy
        # Full weights in the checkpoint's dtype, an adapter in float32 (medicalgpt/precision.py).
        state, dtype = state_dict_for_output(policy, state)
        if self.config.merge_policy and hasattr(policy, "merge_and_unload") and not self.config.deepspeed:
            policy, state, dtype = policy.merge_and_unload(), None, None
        policy.save_pretrained(self.config.output_dir, state_dict=state)
        if dtype is not None:
            write_config_dtype(self.config.output_dir, dtype)
        self.tokenizer.save_pretrained(self.config.output_dir)

    def save_state(self):
        """trainer_state.json in output_dir: the updates done and the log history."""
        if self.accelerator.is_main_process:
            with open(os.path.join(self.config.output_dir, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({"global_step": self.update, "log_history": self.log_history}, f, indent=2)
