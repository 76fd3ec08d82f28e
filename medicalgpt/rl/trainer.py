"""PPO with a critic for causal language models, on accelerate (single process, torchrun/DDP, DeepSpeed).

One rollout batch per update: sample responses to prompts, score them with the reward model, compute per-token
KL-penalised rewards and GAE advantages from the critic, then run `num_ppo_epochs` passes of `num_mini_batches`
minibatches (each accumulated over `gradient_accumulation_steps` micro-batches) of clipped policy and value loss.

Memory: with LoRA the policy is an adapter on the SFT model and the reference policy is the same weights with the
adapter disabled; the critic is an adapter (plus its own score head) on the reward model, and the reward model is
the same weights with that adapter disabled. So two model copies in all, whatever the algorithm needs four of.
The critic starts from the reward model because its head already maps a response to a score on the reward scale,
which makes early value estimates far better than a random head's. Without LoRA (small models) all four are copies.
"""

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, DistributedType
from transformers import TrainingArguments, get_scheduler, set_seed
from transformers.trainer_utils import rotate_checkpoints

from medicalgpt.rl import ppo_math as ppo
from medicalgpt.rl import rollout
from medicalgpt.rl.rewards import reward_model_input, score_sequences

logger = logging.getLogger("medicalgpt")

STATE_FILE = "trainer_state.json"


@dataclass
class PPOConfig(TrainingArguments):
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate for policy and critic."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts to roll out in all (default: num_train_epochs x prompts)."}
    )
    response_length: int = field(default=128, metadata={"help": "Most new tokens per sampled response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (rollouts and their log-probs)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that never emits the stop token."}
    )
    kl_coef: float = field(
        default=0.05, metadata={"help": "Weight of the per-token KL penalty against the SFT model."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy probability ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor (1: text episodes are short)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per pass."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    merge_policy: bool = field(default=False, metadata={"help": "Save the policy merged into full weights."})
    local_rollout_forward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per no-grad forward in a rollout (policy, reference, critic, reward model); "
                  "bounds its memory (default: per_device_train_batch_size)."},
    )  # fmt: skip
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample rollouts with vLLM, colocated on the GPUs (pip install vllm)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory share vLLM reserves with --use_vllm (training keeps the rest)."}
    )
    target_kl: float | None = field(
        default=None, metadata={"help": "Adaptive KL: steer --kl_coef so the KL per response nears this (off: None)."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Episodes over which adaptive KL corrects its error."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "Per-token KL estimate: k1 (log-ratio) or k3 (unbiased, never negative)."}
    )
    normalize_reward: bool = field(
        default=False, metadata={"help": "Normalise scores by their running mean and standard deviation."}
    )

    def __post_init__(self):
        super().__post_init__()
        from medicalgpt.rl.rollout import check_rollout_options

        check_rollout_options(self)


def deepspeed_plugin(config):
    """accelerate's DeepSpeed plugin for --deepspeed (or `accelerate launch` with a DeepSpeed config), with concrete
    batch sizes: accelerate fills "auto" ones from a prepared DataLoader, and PPO prepares none. One micro-batch is
    per_device_train_batch_size sequences; DeepSpeed steps the optimizer every gradient_accumulation_steps of them."""
    plugin = getattr(config, "deepspeed_plugin", None)
    if plugin is None:
        return None
    values = plugin.deepspeed_config
    values["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    values["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    values["train_batch_size"] = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", 1))
    )
    if values.get("gradient_clipping") == "auto":
        values["gradient_clipping"] = config.max_grad_norm
    return plugin


def prepare_frozen(model, accelerator):
    """A frozen model (reference policy, reward model) ready for inference: on the device; under DeepSpeed ZeRO-3,
    where transformers partitioned it at load, in an inference engine of its own (trl's prepare_deepspeed, as trl
    prepares its reference and reward models), since a bare partitioned model holds empty weights."""
    if model is None:
        return None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device).eval()


class PolicyAndValue(torch.nn.Module):
    """Both trained models in one module, so that DDP/DeepSpeed wrap and synchronise them together."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = policy.config  # accelerate sizes DeepSpeed's "auto" ZeRO-3 buckets from config.hidden_size

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        logits = causal_logits(self.policy, input_ids, attention_mask, logits_to_keep)
        return logits, token_values(self.critic, input_ids, attention_mask)


def causal_logits(model, input_ids, attention_mask, logits_to_keep=0):
    """A causal LM's logits for left-padded sequences; only the last `logits_to_keep` positions when non-zero."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep
    ).logits


def token_values(model, input_ids, attention_mask):
    """A sequence-classification model's score head applied at every position: [batch, seq]."""
    seq_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(seq_model, seq_model.base_model_prefix)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return seq_model.score(hidden).squeeze(-1).float()


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def left_pad(sequences, pad_token_id):
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


class PPOTrainer:
    def __init__(self, config, policy, critic, tokenizer, train_prompts, eval_prompts, stop_token_ids,
                 ref_policy=None, reward_model=None, closing_ids=()):  # fmt: skip
        self.config, self.tokenizer, self.stop_token_ids = config, tokenizer, stop_token_ids
        self.closing_ids = list(closing_ids)  # what the template renders after a stop token (rewards.closing_ids)
        self.shaping = rollout.RewardShaping(config)
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.ref_policy, self.reward_model = ref_policy, reward_model
        set_seed(config.seed)
        mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
        self.accelerator = Accelerator(
            cpu=config.use_cpu, mixed_precision=mixed, gradient_accumulation_steps=config.gradient_accumulation_steps,
            deepspeed_plugin=deepspeed_plugin(config),
        )  # fmt: skip
        self.local_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
        self.local_batch *= config.num_mini_batches
        self.global_batch = self.local_batch * self.accelerator.num_processes
        episodes = config.total_episodes or int(config.num_train_epochs * len(train_prompts))
        self.num_updates = (
            config.max_steps if config.max_steps > 0 else max(1, math.ceil(episodes / self.global_batch))
        )
        for model in (policy, critic, ref_policy, reward_model):
            if model is not None:
                disable_dropout(model)
        if config.gradient_checkpointing:
            for model in (policy, critic):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
        self.model = PolicyAndValue(policy, critic)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.scheduler = self._build_scheduler()
        self.ref_policy, self.reward_model = (prepare_frozen(m, self.accelerator) for m in (ref_policy, reward_model))
        self.update, self.log_history, self.writer = 0, [], self._build_writer()

    def _build_scheduler(self):
        """The LR schedule over all optimizer steps, stepped by `optimize` once per optimizer step on every rank.
        Not passed to `accelerator.prepare`: its wrapper (accelerate 1.15 `AcceleratedScheduler`) steps a schedule
        num_processes times per optimizer step, which ended the LR after 1/N of the run under N processes. It is
        built on the innermost torch optimizer, the one whose param_groups' lr the step reads, also under DeepSpeed
        (which may have replaced ours, e.g. by DeepSpeedCPUAdam with an offloaded optimizer)."""
        config = self.config
        optimizer = self.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        steps = self.num_updates * config.num_ppo_epochs * config.num_mini_batches
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, config.get_warmup_steps(steps), steps)
        self.accelerator.register_for_checkpointing(scheduler)
        return scheduler

    @property
    def deepspeed(self):
        """Whether the models run in a DeepSpeed engine, whose optimizer state is sharded over the ranks."""
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _build_writer(self):
        if "tensorboard" not in self.config.report_to or not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        default = os.path.join(self.config.output_dir, "runs", time.strftime("%b%d_%H-%M-%S"))
        return SummaryWriter(os.environ.get("TENSORBOARD_LOGGING_DIR", default))

    def _reference(self):
        """Context in which `self.unwrapped.policy` (or the separate copy) is the frozen reference policy."""
        if self.ref_policy is not None:
            return contextlib.nullcontext(self.ref_policy)
        return _disabled(self.unwrapped.policy)

    def _reward(self):
        if self.reward_model is not None:
            return contextlib.nullcontext(self.reward_model)
        return _disabled(self.unwrapped.critic)

    def batches(self):
        """This process's share of each global batch of prompts, in a seeded order, epoch after epoch."""
        epoch = 0
        while True:
            order = torch.randperm(
                len(self.train_prompts), generator=torch.Generator().manual_seed(self.config.seed + epoch)
            )
            start = self.accelerator.process_index * self.local_batch
            for offset in range(0, len(order) - self.global_batch + 1, self.global_batch):
                chunk = order[offset + start : offset + start + self.local_batch]
                yield [self.train_prompts[i] for i in chunk]
            if len(order) < self.global_batch:  # fewer prompts than one batch: sample with repetition
                yield [
                    self.train_prompts[i % len(order)]
                    for i in order.repeat(self.global_batch)[start:][: self.local_batch]
                ]
            epoch += 1

    @torch.no_grad()
    def generate(self, prompts, greedy=False):
        """Left-padded queries and their responses, each truncated after its first stop token; sampled from exactly
        softmax(logits / temperature), the distribution the loss scores (medicalgpt/rl/rollout.py); with vLLM under
        --use_vllm (evaluation's greedy decoding stays on the policy)."""
        queries, query_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        queries, query_mask = queries.to(self.accelerator.device), query_mask.to(self.accelerator.device)
        if self.config.use_vllm and not greedy:
            responses = rollout.vllm_responses(self._vllm_engine(), queries, query_mask, self.tokenizer.pad_token_id)
        else:
            responses = self._policy_generate(queries, query_mask, greedy)
        responses = ppo.truncate_after_stop(responses, self.stop_token_ids, self.tokenizer.pad_token_id)
        return queries, query_mask, responses

    @property
    def rollout_micro_batch(self):
        return self.config.local_rollout_forward_batch_size or self.config.per_device_train_batch_size

    def _policy_generate(self, queries, query_mask, greedy):
        temperature = None if greedy else self.config.temperature
        generation = rollout.sampling_config(
            self.config.response_length, self.stop_token_ids, self.tokenizer.pad_token_id, temperature
        )
        with self._unwrapped_for_generation() as unwrapped:
            policy = unwrapped.policy
            policy.eval()
            with self.accelerator.autocast():
                # one generate call for the whole batch: it keeps one position's logits per step, and decoding
                # the batch in micro-batches would multiply the sequential steps
                responses = rollout.generate_responses(policy, queries, query_mask, generation, len(queries))
            policy.train()
        return responses

    @contextlib.contextmanager
    def _unwrapped_for_generation(self):
        """The unwrapped models; under DeepSpeed ZeRO-3 with every parameter gathered whole and ZeRO's fetch/release
        hooks lifted while inside, as trl's unwrap_model_for_generation does for its trainers (it needs a
        PreTrainedModel; this is its ZeRO-3 branch): generating from shards would fetch each layer again for every
        new token. Costs one full copy of policy and critic per GPU during generation."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            yield self.unwrapped
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(self.model.parameters()):
            remove_hooks(self.model)
            try:
                yield self.unwrapped
            finally:
                add_hooks(self.model)

    def _vllm_engine(self):
        """The colocated vLLM engine, built on first use; the policy's weights are pushed to it once per update."""
        if getattr(self, "_vllm", None) is None:
            longest = max(map(len, self.train_prompts + self.eval_prompts)) + self.config.response_length
            self._vllm = rollout.build_vllm_generator(
                self.unwrapped.policy, self.accelerator, self.tokenizer, self.config, self.stop_token_ids, longest
            )
            self._vllm_update = None
        if self._vllm_update != self.update:
            self._vllm.sync_weights()
            self._vllm_update = self.update
        return self._vllm

    @torch.no_grad()
    def score(self, queries, query_mask, responses):
        """Reward-model scores of the conversations' full renderings (prompt, response up to its stop token, the
        template's closing suffix), read where the reward model was trained to be read (medicalgpt/rl/rewards.py);
        minus --missing_eos_penalty for responses that never stopped. Also the response mask and the stops."""
        mask, has_stop = ppo.response_mask(responses, self.stop_token_ids)
        sequences = [
            reward_model_input(q[m.bool()].tolist(), r[:n].tolist(), self.stop_token_ids, self.closing_ids)[0]
            for q, m, r, n in zip(queries, query_mask, responses, mask.sum(1).tolist())
        ]
        with self._reward() as reward_model, self.accelerator.autocast():
            scores = score_sequences(reward_model, sequences, self.tokenizer.pad_token_id, self.rollout_micro_batch)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~has_stop).float()
        return scores, mask, has_stop

    @torch.no_grad()
    def rollout(self, prompts):
        """Everything one PPO update needs, computed without gradients, `rollout_micro_batch` sequences at a time."""
        queries, query_mask, responses = self.generate(prompts)
        scores, mask, has_stop = self.score(queries, query_mask, responses)
        input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
        context = queries.shape[1]
        logprobs, values, ref_logprobs = self._rollout_logprobs(input_ids, attention_mask, responses)
        mask_f = mask.float()
        logprobs = logprobs.masked_fill(mask == 0, ppo.INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(mask == 0, ppo.INVALID_LOGPROB)
        values = values[:, context - 1 : -1] * mask_f
        kl_coef = self.shaping.kl_coef
        shaped_scores = self.shaping.normalize(scores, self.accelerator.gather(scores))
        rewards, kl = ppo.compute_rewards(
            shaped_scores, logprobs, ref_logprobs, mask_f, kl_coef, self.shaping.kl_estimator
        )
        self.shaping.after_update(self.accelerator.gather(kl.sum(1)).mean().item(), self.global_batch)
        if self.config.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, mask_f, shift_mean=False)
        advantages, returns = ppo.compute_gae(rewards, values, mask_f, self.config.gamma, self.config.lam)
        advantages = ppo.masked_whiten(advantages, mask_f)
        return dict(input_ids=input_ids, attention_mask=attention_mask, responses=responses, mask=mask_f,
                    logprobs=logprobs, values=values, advantages=advantages, returns=returns, scores=scores,
                    kl=kl, has_stop=has_stop, context=context, kl_coef=kl_coef)  # fmt: skip

    def _rollout_logprobs(self, input_ids, attention_mask, responses):
        """Policy and reference log-probs of the response tokens, and the critic's values (micro-batched)."""
        temperature, micro = self.config.temperature, self.rollout_micro_batch
        with self.accelerator.autocast():
            logprobs, values = rollout.response_logprobs(
                self.model, input_ids, attention_mask, responses, temperature, micro
            )
            with self._reference() as reference:
                reference_logits = functools.partial(causal_logits, reference)
                ref_logprobs, _ = rollout.response_logprobs(
                    reference_logits, input_ids, attention_mask, responses, temperature, micro
                )
        return logprobs, values, ref_logprobs

    def optimize(self, batch):
        """num_ppo_epochs x num_mini_batches optimizer steps on one rollout batch; returns mean statistics."""
        config, stats = self.config, []
        micro = config.per_device_train_batch_size
        minibatch = micro * config.gradient_accumulation_steps
        for _ in range(config.num_ppo_epochs):
            order = torch.randperm(self.local_batch)
            for start in range(0, self.local_batch, minibatch):
                for micro_start in range(start, start + minibatch, micro):
                    index = order[micro_start : micro_start + micro]
                    with self.accelerator.accumulate(self.model):
                        loss, step_stats = self.ppo_loss({k: v[index] if torch.is_tensor(v) else v
                                                          for k, v in batch.items()})  # fmt: skip
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients and config.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    stats.append(step_stats)
        return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}

    def ppo_loss(self, batch):
        context, mask = batch["context"], batch["mask"]
        with self.accelerator.autocast():
            logits, values = self.model(batch["input_ids"], batch["attention_mask"])
        response_logits = logits[:, context - 1 : -1]
        logprobs = ppo.logprobs_from_logits(response_logits, batch["responses"], self.config.temperature)
        logprobs = logprobs.masked_fill(mask == 0, ppo.INVALID_LOGPROB)
        values = values[:, context - 1 : -1]
        pg_loss, clip_fraction, approx_kl = ppo.policy_loss(
            logprobs, batch["logprobs"], batch["advantages"], mask, self.config.cliprange
        )
        vf_loss, vf_clip_fraction = ppo.value_loss(
            values, batch["values"], batch["returns"], mask, self.config.cliprange_value
        )
        with torch.no_grad():
            entropy = ppo.masked_mean(ppo.entropy_from_logits(response_logits, self.config.temperature), mask)
        stats = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "clip_fraction": clip_fraction.item(),
                 "value_clip_fraction": vf_clip_fraction.item(), "approx_kl": approx_kl.item(),
                 "entropy": entropy.item()}  # fmt: skip
        return pg_loss + self.config.vf_coef * vf_loss, stats

    def train(self, resume_from=None):
        config, batches = self.config, self.batches()
        if resume_from:
            self.load_checkpoint(resume_from)
            for _ in range(self.update):  # the same prompt order as the interrupted run
                next(batches)
        logger.info("PPO: %d updates of %d prompts (%d per process), %d PPO epochs x %d minibatches each.",
                    self.num_updates, self.global_batch, self.local_batch, config.num_ppo_epochs,
                    config.num_mini_batches)  # fmt: skip
        start = time.time()
        if config.eval_on_start and self.eval_prompts and self.update == 0:
            self.log(self.evaluate())
        while self.update < self.num_updates:
            batch = self.rollout(next(batches))
            stats = self.optimize(batch)
            self.update += 1
            stats.update(self.rollout_stats(batch))
            if self.update % config.logging_steps == 0 or self.update == 1 or self.update == self.num_updates:
                self.log(stats)
            if config.eval_strategy == "steps" and self.eval_prompts and self.update % config.eval_steps == 0:
                self.log(self.evaluate())
            if config.save_strategy == "steps" and self.update % config.save_steps == 0:
                self.save_checkpoint()
        return {"train_runtime": time.time() - start, "episodes": self.update * self.global_batch}

    def rollout_stats(self, batch):
        """Means over all processes of what the rollout produced."""
        per_response = torch.stack([
            batch["scores"].float(), batch["kl"].sum(1), batch["mask"].sum(1), batch["has_stop"].float(),
        ], dim=1)  # fmt: skip
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

    @torch.no_grad()
    def evaluate(self, prompts=None, greedy=False):
        """Mean reward-model score and length of responses to the evaluation prompts, sampled like the rollouts
        (the policy's expected reward) or greedy."""
        prompts = prompts or self.eval_prompts
        scores, lengths = [], []
        for start in range(0, len(prompts), self.config.per_device_eval_batch_size):
            batch = prompts[start : start + self.config.per_device_eval_batch_size]
            queries, query_mask, responses = self.generate(batch, greedy)
            batch_scores, mask, _ = self.score(queries, query_mask, responses)
            scores.append(batch_scores.float())
            lengths.append(mask.sum(1).float())
        return {
            "eval_score": torch.cat(scores).mean().item(),
            "eval_response_length": torch.cat(lengths).mean().item(),
        }

    def log(self, stats):
        entry = {**{k: round(v, 6) for k, v in stats.items()}, "step": self.update,
                 "episode": self.update * self.global_batch}  # fmt: skip
        self.log_history.append(entry)
        if self.accelerator.is_main_process:
            logger.info("update %d/%d %s", self.update, self.num_updates, json.dumps(entry))
            if self.writer is not None:
                for key, value in stats.items():
                    self.writer.add_scalar(
                        f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, self.update
                    )
                self.writer.flush()

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
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            rotate_checkpoints(self.config.output_dir, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    def gathered_state(self):
        """Full policy and critic state dicts (collective: under DeepSpeed ZeRO-3 every rank must call it, and the
        shards are gathered; saving from rank 0 alone would hang or write empty tensors)."""
        self.accelerator.wait_for_everyone()
        state = self.accelerator.get_state_dict(self.model) or {}  # ZeRO-3: None but on rank 0, which saves
        return {name: {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
                for name in ("policy", "critic")}  # fmt: skip

    def write_state(self, folder):
        state = {"global_step": self.update, "max_steps": self.num_updates, "log_history": self.log_history,
                 "reward_shaping": self.shaping.state_dict()}  # fmt: skip
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

    def save_policy(self):
        """The final policy in output_dir: a LoRA adapter (or merged weights with --merge_policy), the tokenizer and
        trainer_state.json; loadable by inference.py and merge_peft_adapter.py."""
        state = self.gathered_state()["policy"]
        if not self.accelerator.is_main_process:
            return
        policy = self.unwrapped.policy
        if self.config.merge_policy and hasattr(policy, "merge_and_unload") and not self.config.deepspeed:
            policy, state = policy.merge_and_unload(), None
        policy.save_pretrained(self.config.output_dir, state_dict=state)
        self.tokenizer.save_pretrained(self.config.output_dir)
        with open(os.path.join(self.config.output_dir, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump({"global_step": self.update, "log_history": self.log_history}, f, indent=2)


@contextlib.contextmanager
def _disabled(peft_model):
    with peft_model.disable_adapter():
        yield peft_model
