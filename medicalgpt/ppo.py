"""The PPO math for language models, as pure tensor functions (tested on hand-computed numbers).

Shapes: `[batch, response_len]` per response token unless said otherwise. A `mask` is 1 on real response tokens
(up to and including the stop token) and 0 on the padding after it.

The recipe follows the public write-ups of RLHF with PPO ("The N Implementation Details of RLHF with PPO"):
reward = reward-model score on the last token minus a per-token KL penalty against the reference policy;
advantages by GAE (gamma 1, lambda 0.95 for text), whitened per batch; clipped policy ratio and clipped value loss.
"""

import torch

INVALID_LOGPROB = 1.0  # written where the mask is 0, so padded positions contribute exp(0)=1 ratios, never NaN


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values, mask):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    return variance * count / (count - 1) if count > 1 else variance  # unbiased, like torch.var


def masked_whiten(values, mask, shift_mean=True):
    """Zero mean (optionally kept), unit variance over the masked entries; masked-out entries become 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def response_mask(responses, stop_token_ids):
    """1 up to and including the first stop token, 0 after it (generate pads only after a stop).
    Also returns, per response, whether a stop token came at all."""
    is_stop = torch.isin(responses, torch.tensor(stop_token_ids, device=responses.device))
    after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
    return (~after_stop).long(), is_stop.any(dim=1)


def truncate_after_stop(responses, stop_token_ids, pad_token_id):
    """Responses with everything after the first stop token replaced by padding."""
    mask, _ = response_mask(responses, stop_token_ids)
    return torch.where(mask.bool(), responses, torch.full_like(responses, pad_token_id))


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards: -kl_coef * (logprob - ref_logprob) on every token, plus the score on the last real one.

    Returns (rewards, kl) where kl is the per-token estimate log pi - log pi_ref (0 on padding)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, backwards over the response. Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_advantage = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


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


def logprobs_from_logits(logits, tokens, temperature):
    """log p(token) under softmax(logits / temperature), the distribution the rollout sampled from."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits, temperature):
    probs_logits = logits.float() / temperature
    logprobs = torch.log_softmax(probs_logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)
