"""The PPO math for language models, as pure tensor functions (tested on hand-computed numbers).

Shapes: `[batch, response_len]` per response token unless said otherwise. A `mask` is 1 on real response tokens
(up to and including the stop token) and 0 on the padding after it.

The recipe follows the public write-ups of RLHF with PPO ("The N Implementation Details of RLHF with PPO"):
reward = reward-model score on the last token minus a per-token KL penalty against the reference policy;
advantages by GAE (gamma 1, lambda 0.95 for text), whitened per batch. The clipped policy and value losses that
use them are in medicalgpt/rl/ppo_loss.py.
"""

import math

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


def kl_estimate(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from a token sampled from pi (Schulman, "Approximating KL
    divergence"): k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"--kl_estimator must be k1 or k3, got {estimator!r}")


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Per-token rewards: -kl_coef * KL estimate on every token, plus the score on the last real one.

    Returns (rewards, kl) where kl is the per-token estimate (`kl_estimate`; 0 on padding)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences": after each
    rollout batch of `n_steps` episodes, kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon,
    so the KL drifts towards `target` (larger than target: stronger penalty)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self):
        return {"kl_coef": self.value}

    def load_state_dict(self, state):
        self.value = state["kl_coef"]


class RunningMoments:
    """Running mean and standard deviation of every score seen so far (Chan et al.'s parallel update), for reward
    normalisation: (score - mean) / std keeps the reward scale steady while the policy and its scores move."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values):
        """Adds a batch of values (on every process: the gathered batch, so all keep the same moments)."""
        values = values.double()
        batch_count, batch_mean = values.numel(), values.mean().item()
        batch_var = values.var(unbiased=False).item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean, self.var, self.count = self.mean + delta * batch_count / total, m2 / total, total

    @property
    def std(self):
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0  # unbiased

    def normalize(self, values):
        return (values - self.mean) / max(self.std, 1e-8)

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


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


LOGIT_CHUNK_ELEMENTS = 2**25  # logits turned to float32 at once: 128 MB, whatever the batch, length and vocabulary


def selected_logprobs(logits, tokens, temperature):
    """log p(token) under softmax(logits / temperature), the distribution the rollout sampled from.

    Computed as the chosen logit minus the row's logsumexp, a chunk of rows at a time: no float32 copy of the
    [batch, length, vocabulary] log-softmax is ever materialised (for Qwen's 151,936 tokens it would be 0.6 MB a
    token). Differentiable; the gradient is that of log_softmax(...).gather(...)."""
    flat_logits, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    rows = max(1, LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
    pieces = []
    for start in range(0, len(flat_tokens), rows):
        chunk = flat_logits[start : start + rows]
        chosen = chunk.gather(-1, flat_tokens[start : start + rows, None]).squeeze(-1).float()
        pieces.append(chosen / temperature - torch.logsumexp(chunk.float() / temperature, dim=-1))
    return torch.cat(pieces).reshape(tokens.shape)


logprobs_from_logits = selected_logprobs


def entropy_from_logits(logits, temperature):
    """Entropy of softmax(logits / temperature) per position, a chunk of rows at a time (as selected_logprobs)."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
    pieces = []
    for start in range(0, len(flat), rows):
        scaled = flat[start : start + rows].float() / temperature
        logprobs = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
        pieces.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.cat(pieces).reshape(logits.shape[:-1])
