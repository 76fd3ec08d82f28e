"""Stage 4: reinforcement learning from the reward model — PPO with a critic, or trl's RLOO / GRPO.

    python ppo_training.py --sft_model_path outputs-sft-qwen-v1 --reward_model_path outputs-rm-qwen-v1 \\
        --template_name qwen --train_file_dir ./data/finetune --validation_file_dir ./data/finetune \\
        --max_source_length 1024 --response_length 256 --per_device_train_batch_size 1 \\
        --gradient_accumulation_steps 4 --do_train --total_episodes 30000 --missing_eos_penalty 1.0 \\
        --use_peft True --output_dir outputs-ppo-qwen-v1

    torchrun --nproc_per_node 2 ppo_training.py ...          # data parallel (gloo on CPU, NCCL on GPUs)
    python ppo_training.py ... --rl_algorithm grpo --num_generations 4     # critic-free, trl's GRPOTrainer

Prompts are every assistant turn's full preceding context in SFT-format data, rendered with the template. Both
model paths may be LoRA adapter directories. The policy is saved to output_dir as a LoRA adapter on the SFT model
(or merged weights with --merge_policy True), loadable by inference.py. PPO knobs: --kl_coef, --cliprange,
--cliprange_value, --vf_coef, --gamma, --lam, --num_ppo_epochs, --num_mini_batches, --temperature,
--whiten_rewards, --kl_estimator k3, --target_kl (adaptive KL), --normalize_reward; see medicalgpt/rl/trainer.py
for how they are used. Rollouts sample from exactly softmax(logits / --temperature), whatever the model's
generation_config says; --local_rollout_forward_batch_size bounds their memory; --use_vllm samples them with vLLM
on the training GPUs (medicalgpt/rl/rollout.py). The reward model reads the template's full rendering of each
conversation, as in reward training and as any tool reading it with the official chat template (rewards.py).
"""

import dataclasses
import json
import logging
import math
import os
import sys

from transformers import AutoModelForSequenceClassification

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, RLArguments
from medicalgpt.cli import UsageError, run_cli, setup_logging
from medicalgpt.modeling import load_model, load_tokenizer, wrap_with_lora
from medicalgpt.parser import expand_config_file, parse_args
from medicalgpt.rl.rewards import RewardModelScorer, closing_ids, stop_token_ids
from medicalgpt.rl.trainer import PPOConfig, PPOTrainer, prepare_frozen
from medicalgpt.templates import build_template
from medicalgpt.train.checkpoints import with_atomic_checkpoints
from medicalgpt.train.preprocess import prepare_rl_prompts
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, end_training, find_resume_checkpoint

logger = logging.getLogger("medicalgpt")


def requested_algorithm(argv):
    argv = expand_config_file(argv)
    for index, arg in enumerate(argv):
        if arg == "--rl_algorithm" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--rl_algorithm="):
            return arg.split("=", 1)[1]
    return "ppo"


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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    config, model_args, data_args, lora_args, rl_args = parse_args(
        config_class(requested_algorithm(argv)), ModelArguments, DataArguments, LoraArguments, RLArguments,
        argv=argv,
    )  # fmt: skip
    setup_logging(config)
    model_args.model_name_or_path = rl_args.sft_model_path or model_args.model_name_or_path
    if not model_args.model_name_or_path or not rl_args.reward_model_path:
        raise UsageError("ppo_training.py needs --sft_model_path and --reward_model_path")
    check_and_log_args(config, model_args, lora_args)
    train_records, eval_records = load_stage_records(data_args, config, stage="sft")
    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args.template_name, tokenizer)
    prompts = [
        prepare_rl_prompts(records or [], template, tokenizer, rl_args.max_source_length, data_args.system_prompt)
        for records in (train_records, eval_records)
    ]
    logger.info("RL prompts: %d for training, %d for evaluation.", len(prompts[0]), len(prompts[1]))
    stops = stop_token_ids(tokenizer, template)
    closing = closing_ids(tokenizer, template)  # the reward model reads the template's full rendering
    if rl_args.rl_algorithm == "ppo":
        run_ppo(config, model_args, lora_args, rl_args, tokenizer, prompts, stops, closing)
    else:
        run_critic_free(config, model_args, lora_args, rl_args, tokenizer, prompts, stops, closing)
    logger.info("Outputs in %s", config.output_dir)


def run_ppo(config, model_args, lora_args, rl_args, tokenizer, prompts, stops, closing=()):
    use_peft = lora_args.use_peft or lora_args.peft_path
    policy = wrap_with_lora(load_model(model_args), lora_args, config, model_args.model_name_or_path)
    critic = load_reward_model(model_args, rl_args, tokenizer)
    reference = reward = None
    if use_peft:
        critic = wrap_with_lora(critic, lora_args, config, rl_args.reward_model_path, task_type="SEQ_CLS")
    else:
        reference, reward = frozen(load_model(model_args)), frozen(load_reward_model(model_args, rl_args, tokenizer))
    trainer = PPOTrainer(config, policy, critic, tokenizer, prompts[0], prompts[1], stops, reference, reward, closing)
    if config.do_train:
        metrics = trainer.train(resume_from=find_resume_checkpoint(config))
        trainer.save_policy()
        save_metrics(trainer.accelerator, config.output_dir, "train", metrics)
    if config.do_eval and prompts[1]:
        save_metrics(trainer.accelerator, config.output_dir, "eval", trainer.evaluate())
    end_training(trainer.accelerator, trainer.model)


def run_critic_free(config, model_args, lora_args, rl_args, tokenizer, prompts, stops, closing=()):
    """RLOO or GRPO through trl, scored by the same reward model (and the same missing-stop penalty)."""
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    config.max_completion_length = rl_args.response_length
    if rl_args.total_episodes:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
        config.max_steps = math.ceil(rl_args.total_episodes * config.num_generations / per_step)
    policy = wrap_with_lora(load_model(model_args), lora_args, config, model_args.model_name_or_path)
    scorer = RewardModelScorer(frozen(load_reward_model(model_args, rl_args, tokenizer)), tokenizer, stops,
                               rl_args.missing_eos_penalty, closing)  # fmt: skip
    datasets = [Dataset.from_dict({"prompt": tokenizer.batch_decode(p)}) if p else None for p in prompts]
    trainer_class = with_atomic_checkpoints(RLOOTrainer if rl_args.rl_algorithm == "rloo" else GRPOTrainer)
    trainer = trainer_class(model=policy, reward_funcs=scorer, args=config, train_dataset=datasets[0],
                            eval_dataset=datasets[1], processing_class=tokenizer)  # fmt: skip
    scorer.model = prepare_frozen(scorer.model, trainer.accelerator)  # ZeRO-3: an engine, as trl's own reward models
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
