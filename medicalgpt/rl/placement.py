"""Where PPO's models run under accelerate and DeepSpeed: the DeepSpeed plugin with concrete batch sizes, frozen models
(reference policy, reward model) placed for inference, and the policy gathered whole for generation under ZeRO-3."""

import contextlib
import os


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
