"""The trainer config of an RL run: PPOConfig (PPO's options on top of transformers' TrainingArguments), or trl's
RLOOConfig / GRPOConfig as --rl_algorithm picks, read after a leading run.yaml is expanded. The accelerate /
DeepSpeed setup PPOConfig implies is medicalgpt/rl/placement.py."""

import argparse
from dataclasses import dataclass, field

import yaml
from transformers import TrainingArguments

from medicalgpt.errors import UsageError
from medicalgpt.parser import expand_config_file
from medicalgpt.rl.rollout import check_rollout_options


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
        metadata={
            "help": "Sequences per no-grad forward in a rollout (policy, reference, critic, reward model); "
            "bounds its memory (default: per_device_train_batch_size)."
        },
    )
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
        check_rollout_options(self)


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
