"""PPO's logs: what each rollout produced, averaged over the processes, kept in the log history (trainer_state.json)
and written to the console and TensorBoard; a split's final metrics logged and saved as Trainer saves them."""

import json
import logging
import os
import time

import torch

logger = logging.getLogger("medicalgpt")


class PPOLogs:
    """PPOTrainer's logging (a mixin: it reads the trainer's config, accelerator, scheduler, update, num_updates,
    global_batch, log_history and writer)."""

    def _build_writer(self):
        if "tensorboard" not in self.config.report_to or not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        default = os.path.join(self.config.output_dir, "runs", time.strftime("%b%d_%H-%M-%S"))
        return SummaryWriter(os.environ.get("TENSORBOARD_LOGGING_DIR", default))

    def rollout_stats(self, batch):
        """Means over all processes of what the rollout produced."""
        per_response = torch.stack(
            [
                batch["scores"].float(),
                batch["kl"].sum(1),
                batch["mask"].sum(1),
                batch["has_stop"].float(),
            ],
            dim=1,
        )
        means = self.accelerator.gather(per_response).mean(0).tolist()
        score, kl, length, stop_rate = means
        reward = score - batch["kl_coef"] * kl
        lr = self.scheduler.get_last_lr()[0]
        return {
            "score": score,
            "kl": kl,
            "reward": reward,
            "kl_coef": batch["kl_coef"],
            "response_length": length,
            "stop_rate": stop_rate,
            "lr": lr,
        }

    def log(self, stats):
        entry = {
            **{k: round(v, 6) for k, v in stats.items()},
            "step": self.update,
            "episode": self.update * self.global_batch,
        }
        self.log_history.append(entry)
        if self.accelerator.is_main_process:
            logger.info("update %d/%d %s", self.update, self.num_updates, json.dumps(entry))
            if self.writer is not None:
                for key, value in stats.items():
                    self.writer.add_scalar(
                        f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, self.update
                    )
                self.writer.flush()

    def log_metrics(self, split, metrics):
        """A split's final metrics on the console (main process), under Trainer's name."""
        if self.accelerator.is_main_process:
            logger.info("%s metrics: %s", split, json.dumps(metrics))

    def save_metrics(self, split, metrics):
        """<split>_results.json in output_dir (main process), under Trainer's name."""
        if self.accelerator.is_main_process:
            with open(os.path.join(self.config.output_dir, f"{split}_results.json"), "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2)
