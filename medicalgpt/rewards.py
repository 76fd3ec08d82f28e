"""Scoring responses with a reward model, shared by PPO (medicalgpt/ppo_trainer.py) and trl's RLOO / GRPO."""

import logging

import torch

logger = logging.getLogger("medicalgpt")


def stop_token_ids(tokenizer, template):
    """Token ids that end a response: the template's end-of-turn token and the tokenizer's EOS."""
    ids = []
    stop_ids = tokenizer.encode(template.stop_str, add_special_tokens=False) if template.stop_str else []
    if len(stop_ids) == 1:
        ids.append(stop_ids[0])
    elif stop_ids:
        logger.warning("The template's stop string %r is %d tokens; stopping at EOS only.", template.stop_str,
                       len(stop_ids))  # fmt: skip
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class RewardModelScorer:
    """A trl reward function: the reward model's score of prompt + completion (with its stop token, as in reward
    training), minus `missing_eos_penalty` for completions that never stopped."""

    __name__ = "reward_model"

    def __init__(self, reward_model, tokenizer, stop_ids, missing_eos_penalty=None):
        self.model, self.tokenizer, self.stop_ids = reward_model, tokenizer, stop_ids
        self.missing_eos_penalty = missing_eos_penalty

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        sequences = [
            self.tokenizer.encode(p, add_special_tokens=False) + list(c) for p, c in zip(prompts, completion_ids)
        ]
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.model.device)
        attention_mask = torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.model.device
        )
        scores = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        if self.missing_eos_penalty:
            stopped = torch.tensor([any(t in self.stop_ids for t in c) for c in completion_ids], device=scores.device)
            scores = scores - self.missing_eos_penalty * (~stopped).float()
        return scores.tolist()
