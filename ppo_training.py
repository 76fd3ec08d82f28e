"""Stage 4: reinforcement learning from the reward model — PPO with a critic, or trl's RLOO / GRPO.

    python ppo_training.py --sft_model_path outputs-sft-qwen-v1 --reward_model_path outputs-rm-qwen-v1 \\
        --template_name qwen --train_file_dir ./data/finetune --validation_file_dir ./data/finetune \\
        --max_source_length 1024 --response_length 256 --per_device_train_batch_size 1 \\
        --gradient_accumulation_steps 4 --do_train --total_episodes 30000 --missing_eos_penalty 1.0 \\
        --use_peft True --output_dir outputs-ppo-qwen-v1

    torchrun --nproc_per_node 2 ppo_training.py ...          # data parallel (gloo on CPU, NCCL on GPUs)
    python ppo_training.py ... --rl_algorithm grpo --num_generations 4     # critic-free, trl's GRPOTrainer

    python ppo_training.py --rl_algorithm grpo --sft_model_path Qwen/Qwen3-0.6B --template_name qwen3 \\
        --reward_funcs choice_accuracy,format --reward_weights 1 0.2 --train_file_dir data/grpo/train.jsonl \\
        --num_generations 8 --per_device_train_batch_size 8 --response_length 1024 --use_peft True \\
        --do_train --output_dir outputs-grpo-qwen3      # verifiable rewards on exam items, no reward model

Prompts are every assistant turn's full preceding context in SFT-format data, rendered with the template. Both
model paths may be LoRA adapter directories. The policy is saved to output_dir as a LoRA adapter on the SFT model
(or merged weights with --merge_policy True), loadable by inference.py. PPO knobs: --kl_coef, --cliprange,
--cliprange_value, --vf_coef, --gamma, --lam, --num_ppo_epochs, --num_mini_batches, --temperature,
--whiten_rewards, --kl_estimator k3, --target_kl (adaptive KL), --normalize_reward; see medicalgpt/rl/trainer.py
for how they are used. Rollouts sample from exactly softmax(logits / --temperature), whatever the model's
generation_config says; --local_rollout_forward_batch_size bounds their memory; --use_vllm samples them with vLLM
on the training GPUs (medicalgpt/rl/rollout.py). The reward model reads the template's full rendering of each
conversation, as in reward training and as any tool reading it with the official chat template (rewards.py).
With --reward_funcs choice_accuracy the data are exam items (evaluate.py's choice files), scored by the option
letters each answer commits to; `format` rewards Qwen3's <think> structure (medicalgpt/rl/verifiable.py).
"""

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys

import yaml
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, RLArguments
from medicalgpt.cli import UsageError, run_cli, setup_logging
from medicalgpt.modeling import load_model, load_tokenizer, wrap_with_lora
from medicalgpt.parser import expand_config_file, parse_args
from medicalgpt.rl.config import PPOConfig, prepare_frozen
from medicalgpt.rl.exam import load_exam_splits, reward_columns
from medicalgpt.rl.rewards import RewardModelScorer, closing_ids
from medicalgpt.rl.rollout import stop_token_ids
from medicalgpt.rl.trainer import PPOTrainer
from medicalgpt.rl.verifiable import VERIFIABLE_REWARDS
from medicalgpt.templates import build_template, retokenizable_texts
from medicalgpt.train.checkpoints import with_atomic_checkpoints
from medicalgpt.train.preprocess import prepare_rl_prompts
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, end_training, find_resume_checkpoint

logger = logging.getLogger("medicalgpt")


def main(argv=None):
    argv = read_config_file(sys.argv[1:] if argv is None else argv)
    config, model_args, data_args, lora_args, rl_args = parse_args(
        config_class(requested_algorithm(argv)), ModelArguments, DataArguments, LoraArguments, RLArguments, argv=argv
    )
    setup_logging(config)
    check_rl_args(config, model_args, rl_args)
    check_and_log_args(config, model_args, lora_args)

    # Data: exam items for --reward_funcs choice_accuracy, else SFT records; all checked before any model loads
    if "choice_accuracy" in rl_args.reward_names:
        train_records, eval_records = load_exam_splits(data_args, config)
    else:
        train_records, eval_records = load_stage_records(data_args, config, stage="sft")
    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args.template_name, tokenizer)
    check_format_reward(rl_args, template)
    render = functools.partial(
        prepare_rl_prompts,
        template=template,
        tokenizer=tokenizer,
        max_source_length=rl_args.max_source_length,
        system_prompt=data_args.system_prompt,
    )
    train_prompts = render(train_records or [])  # every assistant turn's preceding context, rendered
    eval_prompts = render(eval_records or [])
    logger.info("RL prompts: %d for training, %d for evaluation.", len(train_prompts), len(eval_prompts))
    stops = stop_token_ids(tokenizer, template)
    closing = closing_ids(tokenizer, template)  # the reward model reads the template's full rendering

    # Model and training
    run = RLRun(config, model_args, lora_args, rl_args, tokenizer, stop_ids=stops, closing_ids=closing)
    if rl_args.rl_algorithm == "ppo":
        train_ppo(build_ppo_trainer(run, train_prompts=train_prompts, eval_prompts=eval_prompts), config)
    else:
        train_dataset = prompt_dataset(tokenizer, train_prompts, train_records)
        eval_dataset = prompt_dataset(tokenizer, eval_prompts, eval_records)
        train_critic_free(run, train_dataset=train_dataset, eval_dataset=eval_dataset)
    logger.info("Outputs in %s", config.output_dir)


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


def prompt_dataset(tokenizer, prompts, records):
    """trl's dataset: the rendered prompts as text that trl encodes back into the same ids (no second BOS), and for
    exam records the answer and option letters the verifiable rewards read (trl passes every other column to them)."""
    if not prompts:
        return None
    texts, differ = retokenizable_texts(tokenizer, prompts)
    if differ:
        logger.warning("%d of %d RL prompts differ from the template's ids once trl encodes them", differ, len(texts))
    return Dataset.from_dict({"prompt": texts, **reward_columns(records)})


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


def read_config_file(argv):
    """The command line with a leading run.yaml / run.json expanded into flags (once: --rl_algorithm may be there)."""
    try:
        return expand_config_file(argv)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise UsageError(str(error)) from error


def requested_algorithm(argv):
    """--rl_algorithm alone: the first of two parse steps, since it picks the trainer config the full parse reads.
    An invalid value is left for that parse (RLArguments) to reject."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--rl_algorithm", default="ppo")
    return parser.parse_known_args(argv)[0].rl_algorithm


def config_class(algorithm):
    """The config of the requested trainer (trl's critic-free ones are imported only when asked for)."""
    if algorithm == "rloo":
        from trl import RLOOConfig

        return RLOOConfig
    if algorithm == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    return PPOConfig


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
    reference = reward_model = None
    if lora_args.use_peft:
        critic = wrap_with_lora(critic, lora_args, config, rl_args.reward_model_path, task_type="SEQ_CLS")
    else:
        reference = frozen(load_model(model_args))
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


def train_ppo(trainer, config):
    if config.do_train:
        metrics = trainer.train(resume_from=find_resume_checkpoint(config))
        trainer.save_policy()
        save_metrics(trainer.accelerator, config.output_dir, "train", metrics)
    if config.do_eval and trainer.eval_prompts:
        save_metrics(trainer.accelerator, config.output_dir, "eval", trainer.evaluate())
    end_training(trainer.accelerator, trainer.model)


def train_critic_free(run, train_dataset, eval_dataset):
    """RLOO or GRPO through trl, with the rewards --reward_funcs names (weighted by --reward_weights): the reward
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
    if config.do_train:
        result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(config))
        trainer.save_model()
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    end_training(trainer.accelerator, trainer.model_wrapped)


def save_metrics(accelerator, output_dir, split, metrics):
    if accelerator.is_main_process:
        logger.info("%s metrics: %s", split, json.dumps(metrics))
        with open(os.path.join(output_dir, f"{split}_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    sys.exit(run_cli(main))
