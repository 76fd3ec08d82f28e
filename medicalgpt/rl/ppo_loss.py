"""PPO's losses: the clipped policy and value losses as pure tensor functions, and their sum on one micro-batch
(the policy's and the critic's forward)."""

import contextlib

import torch

from medicalgpt.rl import ppo_math as ppo
from medicalgpt.rl.ppo_math import masked_mean


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """Clipped surrogate objective. Returns (loss, clip_fraction, approx_kl)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: the worse of the unclipped and the clipped squared error, halved."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    clip_fraction = masked_mean(((clipped_values - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, clip_fraction


def ppo_loss(model, batch, config, autocast=contextlib.nullcontext):
    """The clipped policy loss plus vf_coef x the clipped value loss on one micro-batch of a rollout batch (as
    PPOTrainer.rollout builds it), and its statistics. `model` is PolicyAndValue (or its DDP/DeepSpeed wrapper);
    its forward runs inside `autocast()`."""
    context, mask = batch["context"], batch["mask"]
    # The vocabulary head runs only on the positions whose logits the loss reads (the one before each response
    # token, and the last): on the prompt's it cost a [batch, prompt, vocabulary] product forward and backward
    # for nothing. The kept rows' logits and gradients are bit-identical (tests/rl/test_rollout.py).
    with autocast():
        logits, values = model(batch["input_ids"], batch["attention_mask"], batch["responses"].shape[1] + 1)
    response_logits = logits[:, :-1]
    logprobs = ppo.logprobs_from_logits(response_logits, batch["responses"], config.temperature)
    logprobs = logprobs.masked_fill(mask == 0, ppo.INVALID_LOGPROB)
    values = values[:, context - 1 : -1]
    pg_loss, clip_fraction, approx_kl = policy_loss(
        logprobs, batch["logprobs"], batch["advantages"], mask, config.cliprange
    )
    vf_loss, vf_clip_fraction = value_loss(values, batch["values"], batch["returns"], mask, config.cliprange_value)
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
