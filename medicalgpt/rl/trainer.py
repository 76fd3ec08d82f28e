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
import logging
import math
import time

import torch
from accelerate import Accelerator, DistributedType
from transformers import get_scheduler, set_seed
from transformers.trainer_utils import TrainOutput

from medicalgpt.rl import ppo_math as ppo
from medicalgpt.rl import rollout
from medicalgpt.rl.models import PolicyAndValue, causal_logits, disable_dropout, left_pad
from medicalgpt.rl.placement import deepspeed_plugin, prepare_frozen, unwrapped_for_generation
from medicalgpt.rl.ppo_checkpoints import PPOCheckpoints
from medicalgpt.rl.ppo_logs import PPOLogs
from medicalgpt.rl.ppo_loss import ppo_loss
from medicalgpt.rl.rewards import reward_model_input, score_sequences

logger = logging.getLogger("medicalgpt")


class PPOTrainer(PPOCheckpoints, PPOLogs):
    """PPO on `train_prompts` (token id lists, each a rendered prompt up to the generation prompt).

    `stop_token_ids` end a response; `closing_ids` are what the template renders after the stop token (the reward
    model reads the full rendering, medicalgpt/rl/rewards.py). Without `ref_policy` / `reward_model` the policy's and
    the critic's LoRA adapters are disabled to get them (one copy of each model's weights)."""

    def __init__(
        self,
        config,
        *,
        policy,
        critic,
        tokenizer,
        train_prompts,
        eval_prompts=(),
        stop_token_ids,
        ref_policy=None,
        reward_model=None,
        closing_ids=(),
    ):
        self.config, self.tokenizer, self.stop_token_ids = config, tokenizer, stop_token_ids
        self.closing_ids = list(closing_ids)
        self.shaping = rollout.RewardShaping(config)
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        set_seed(config.seed)
        mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
        self.accelerator = Accelerator(
            cpu=config.use_cpu,
            mixed_precision=mixed,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            deepspeed_plugin=deepspeed_plugin(config),
        )
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
        self.ref_policy = prepare_frozen(ref_policy, self.accelerator)
        self.reward_model = prepare_frozen(reward_model, self.accelerator)
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
    def model_wrapped(self):
        """The prepared (DDP / DeepSpeed) model, under Trainer's name for it."""
        return self.model

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

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
        with unwrapped_for_generation(self.accelerator, self.model) as unwrapped:
            policy = unwrapped.policy
            policy.eval()
            with self.accelerator.autocast():
                # one generate call for the whole batch: it keeps one position's logits per step, and decoding
                # the batch in micro-batches would multiply the sequential steps
                responses = rollout.generate_responses(policy, queries, query_mask, generation, len(queries))
            policy.train()
        return responses

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
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            responses=responses,
            mask=mask_f,
            logprobs=logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
            scores=scores,
            kl=kl,
            has_stop=has_stop,
            context=context,
            kl_coef=kl_coef,
        )

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
                        micro_batch = {k: v[index] if torch.is_tensor(v) else v for k, v in batch.items()}
                        loss, step_stats = ppo_loss(self.model, micro_batch, self.config, self.accelerator.autocast)
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients and config.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    stats.append(step_stats)
        return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}

    def train(self, resume_from_checkpoint=None):
        """Roll out and optimise until num_updates, from `resume_from_checkpoint` when given. Returns transformers'
        TrainOutput, as Trainer.train does, so the scripts end every trainer the same way."""
        config, batches = self.config, self.batches()
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
            for _ in range(self.update):  # the same prompt order as the interrupted run
                next(batches)
        logger.info(
            "PPO: %d updates of %d prompts (%d per process), %d PPO epochs x %d minibatches each.",
            self.num_updates,
            self.global_batch,
            self.local_batch,
            config.num_ppo_epochs,
            config.num_mini_batches,
        )
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
        metrics = {"train_runtime": time.time() - start, "episodes": self.update * self.global_batch}
        return TrainOutput(global_step=self.update, training_loss=None, metrics=metrics)

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


@contextlib.contextmanager
def _disabled(peft_model):
    with peft_model.disable_adapter():
        yield peft_model
