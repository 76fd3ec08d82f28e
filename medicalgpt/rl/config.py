"""PPOConfig, PPO's options on top of transformers' TrainingArguments, and the accelerate / DeepSpeed setup they
imply: the DeepSpeed plugin with concrete batch sizes, and frozen models (reference policy, reward model) placed for
inference."""

import contextlib
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

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


@contextlib.contextmanager
def unwrapped_for_generation(accelerator, model):
    """The unwrapped `model`; under DeepSpeed ZeRO-3 with every parameter gathered whole and ZeRO's fetch/release
    hooks lifted while inside, as trl's unwrap_model_for_generation does for its trainers (it needs a
    PreTrainedModel; this is its ZeRO-3 branch): generating from shards would fetch each layer again for every
    new token. Costs one full copy of policy and critic per GPU during generation."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield accelerator.unwrap_model(model)
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(model.parameters()):
        remove_hooks(model)
        try:
            yield accelerator.unwrap_model(model)
        finally:
            add_hooks(model)
