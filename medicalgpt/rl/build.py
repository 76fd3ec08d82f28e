"""The RL trainers of ppo_training.py, built from the parsed arguments: PPO (policy, critic, and the reference policy
and reward model they imply) or trl's RLOO / GRPO with the rewards --reward_funcs names. Each is ended the same way
by the script (train, save, evaluate), PPOTrainer speaking Trainer's names for it."""

import dataclasses
import math

from transformers import AutoModelForSequenceClassification

from medicalgpt.args import LoraArguments, ModelArguments, RLArguments
from medicalgpt.errors import UsageError
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model
from medicalgpt.precision import set_frozen_precision
from medicalgpt.rl.placement import prepare_frozen
from medicalgpt.rl.rewards import RewardModelScorer
from medicalgpt.rl.trainer import PPOTrainer
from medicalgpt.rl.verifiable import VERIFIABLE_REWARDS
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints


@dataclasses.dataclass
class RLRun:
    """What every trainer here is built from: the parsed arguments, the tokenizer, the template's stop token ids and
    what it renders after them (the reward model reads the full rendering, medicalgpt/rl/rewards.py)."""

    config: object
    model_args: ModelArguments
    lora_args: LoraArguments
    rl_args: RLArguments
    tokenizer: object
    stop_ids: list
    closing_ids: list


def check_rl_args(config, model_args, rl_args):
    """One-line errors, before anything loads, for a run that cannot work."""
    if not model_args.model_name_or_path:
        raise UsageError("ppo_training.py needs --sft_model_path (the policy to train)")
    if "reward_model" in rl_args.reward_names and not rl_args.reward_model_path:
        raise UsageError("--reward_funcs reward_model (the default) needs --reward_model_path")
    weights = getattr(config, "reward_weights", None)
    if weights is not None and len(weights) != len(rl_args.reward_names):
        raise UsageError(
            f"--reward_weights gives {len(weights)} weights for {len(rl_args.reward_names)} "
            f"--reward_funcs ({rl_args.reward_funcs})"
        )


def check_format_reward(rl_args, template):
    if "format" in rl_args.reward_names and getattr(template, "thinking", None) is not True:
        raise UsageError(
            "--reward_funcs format checks Qwen3's <think> block: use a thinking template (--template_name qwen3)"
        )


def load_reward_model(model_args, rl_args, tokenizer):
    reward_args = dataclasses.replace(model_args, model_name_or_path=rl_args.reward_model_path)
    model = load_model(reward_args, model_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def frozen(model):
    model.requires_grad_(False)
    return model.eval()


def build_ppo_trainer(run, train_prompts, eval_prompts):
    """Policy and critic; with LoRA the reference policy and the reward model are those two with their adapters
    disabled, without LoRA frozen copies."""
    config, model_args, lora_args, rl_args = run.config, run.model_args, run.lora_args, run.rl_args
    policy = wrap_with_lora(load_model(model_args), lora_args, config, model_args.model_name_or_path)
    critic = load_reward_model(model_args, rl_args, run.tokenizer)
    # Full training too: the critic's weights in float32 whatever the checkpoint's (medicalgpt/precision.py)
    critic = wrap_with_lora(critic, lora_args, config, rl_args.reward_model_path, task_type="SEQ_CLS")
    reference = reward_model = None
    if not lora_args.use_peft:
        reference = frozen(set_frozen_precision(load_model(model_args), config))  # computes as the policy does
        reward_model = frozen(load_reward_model(model_args, rl_args, run.tokenizer))
    return PPOTrainer(
        config,
        policy=policy,
        critic=critic,
        tokenizer=run.tokenizer,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        stop_token_ids=run.stop_ids,
        ref_policy=reference,
        reward_model=reward_model,
        closing_ids=run.closing_ids,
    )


def build_critic_free_trainer(run, train_dataset, eval_dataset):
    """trl's RLOO or GRPO trainer, with the rewards --reward_funcs names (weighted by --reward_weights): the reward
    model (with the same missing-stop penalty as PPO) and the verifiable rules of medicalgpt/rl/verifiable.py."""
    from trl import GRPOTrainer, RLOOTrainer

    config, model_args, rl_args, tokenizer = run.config, run.model_args, run.rl_args, run.tokenizer
    config.max_completion_length = rl_args.response_length
    if rl_args.total_episodes:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
        config.max_steps = math.ceil(rl_args.total_episodes * config.num_generations / per_step)
    policy = wrap_with_lora(load_model(model_args), run.lora_args, config, model_args.model_name_or_path)
    scorer = None
    if "reward_model" in rl_args.reward_names:
        reward_model = frozen(load_reward_model(model_args, rl_args, tokenizer))
        scorer = RewardModelScorer(reward_model, tokenizer, run.stop_ids, rl_args.missing_eos_penalty, run.closing_ids)
    reward_funcs = [scorer if name == "reward_model" else VERIFIABLE_REWARDS[name] for name in rl_args.reward_names]
    trl_trainer = RLOOTrainer if rl_args.rl_algorithm == "rloo" else GRPOTrainer
    trainer_class = with_atomic_checkpoints(trl_trainer)
    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if scorer is not None:  # ZeRO-3: an inference engine, as trl prepares its own reward models
        scorer.model = prepare_frozen(scorer.model, trainer.accelerator)
    return trainer
