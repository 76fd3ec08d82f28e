"""PPO's loss on one micro-batch: the policy's and the critic's forward, clipped policy and value losses."""

import contextlib

import torch

from medicalgpt.rl import ppo_math as ppo


def ppo_loss(model, batch, config, autocast=contextlib.nullcontext):
    """The clipped policy loss plus vf_coef x the clipped value loss on one micro-batch of a rollout batch (as
    PPOTrainer.rollout builds it), and its statistics. `model` is PolicyAndValue (or its DDP/DeepSpeed wrapper);
    its forward runs inside `autocast()`."""
    context, mask = batch["context"], batch["mask"]
    with autocast():
        logits, values = model(batch["input_ids"], batch["attention_mask"])
    response_logits = logits[:, context - 1 : -1]
    logprobs = ppo.logprobs_from_logits(response_logits, batch["responses"], config.temperature)
    logprobs = logprobs.masked_fill(mask == 0, ppo.INVALID_LOGPROB)
    values = values[:, context - 1 : -1]
    pg_loss, clip_fraction, approx_kl = ppo.policy_loss(
        logprobs, batch["logprobs"], batch["advantages"], mask, config.cliprange
    )
    vf_loss, vf_clip_fraction = ppo.value_loss(values, batch["values"], batch["returns"], mask, config.cliprange_value)
    with torch.no_grad():
        entropy = ppo.masked_mean(ppo.entropy_from_logits(response_logits, config.temperature), mask)
    stats = {
        "policy_loss": pg_loss.item(),
        "value_loss": vf_loss.item(),
        "clip_fraction": clip_fraction.item(),
        "value_clip_fraction": vf_clip_fraction.item(),
        "approx_kl": approx_kl.item(),
        "entropy": entropy.item(),
    }
    return pg_loss + config.vf_coef * vf_loss, stats
