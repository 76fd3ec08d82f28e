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

import functools
import logging
import sys

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, RLArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.loader import load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.rl.build import RLRun, build_critic_free_trainer, build_ppo_trainer, check_format_reward, check_rl_args
from medicalgpt.rl.config import config_class, read_config_file, requested_algorithm
from medicalgpt.rl.exam import load_exam_splits
from medicalgpt.rl.prompts import prepare_rl_prompts, prompt_dataset
from medicalgpt.rl.rewards import closing_ids
from medicalgpt.rl.rollout import stop_token_ids
from medicalgpt.templates import build_template
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary

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
    logger.debug("RL prompts: %d for training, %d for evaluation.", len(train_prompts), len(eval_prompts))
    stops = stop_token_ids(tokenizer, template)
    closing = closing_ids(tokenizer, template)  # the reward model reads the template's full rendering

    # Model: PPO's policy and critic, or trl's RLOO / GRPO on the rendered prompts
    run = RLRun(config, model_args, lora_args, rl_args, tokenizer, stop_ids=stops, closing_ids=closing)
    if rl_args.rl_algorithm == "ppo":
        trainer = build_ppo_trainer(run, train_prompts=train_prompts, eval_prompts=eval_prompts)
    else:
        trainer = build_critic_free_trainer(
            run,
            train_dataset=prompt_dataset(tokenizer, train_prompts, train_records),
            eval_dataset=prompt_dataset(tokenizer, eval_prompts, eval_records),
        )

    add_run_summary(trainer, model_args, run.lora_args, rl_args)
    # Train (a run with no evaluation prompts, exam items without a validation dir, skips evaluation)
    train_and_evaluate(trainer, config, can_evaluate=bool(eval_prompts))


if __name__ == "__main__":
    sys.exit(run_cli(main))
