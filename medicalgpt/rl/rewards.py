"""Scoring responses with a reward model, shared by reward training, PPO (medicalgpt/rl/trainer.py) and trl's
RLOO / GRPO.

One convention, the ecosystem's: the reward model reads the official chat template's full rendering of the
conversation (for ChatML `...<|im_start|>assistant\nANSWER<|im_end|>\n`, the template's `closing_suffix` included),
and its score is the head's output where transformers' `*ForSequenceClassification` reads it: the last token that
is not the pad token. That is what trl's RewardTrainer trains on and what trl's `reward_funcs=<path>`, vLLM's
reward serving and a plain `AutoModelForSequenceClassification` compute, so a reward model trained here scores the
same inside and outside the project, whatever the pad and stop tokens are (pad == stop included).
"""

import torch


def closing_ids(tokenizer, template):
    """Token ids the template renders after the last answer's stop token (ChatML: "\n")."""
    suffix = getattr(template, "closing_suffix", "")
    return tokenizer.encode(suffix, add_special_tokens=False) if suffix else []


def reward_model_input(prompt_ids, completion_ids, stop_ids, suffix_ids):
    """The token ids a reward model scores: the prompt, the completion up to and including its first stop token,
    then the template's closing suffix when the completion stopped (the full rendering of the conversation).
    Returns (ids, stopped)."""
    completion = list(completion_ids)
    stop_at = next((i for i, token in enumerate(completion) if token in stop_ids), None)
    if stop_at is None:
        return list(prompt_ids) + completion, False
    return list(prompt_ids) + completion[: stop_at + 1] + list(suffix_ids), True


@torch.no_grad()
def score_sequences(model, sequences, pad_token_id, micro_batch=None):
    """The reward model's scores of token id lists, right-padded in batches of `micro_batch`: the model's own
    forward, which reads the last non-pad token (`model.config.pad_token_id` must be the tokenizer's pad)."""
    device = next(model.parameters()).device
    micro_batch = micro_batch or len(sequences)
    scores = []
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        width = max(map(len, batch))
        input_ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in batch], device=device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        scores.append(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float())
    return torch.cat(scores)


class RewardModelScorer:
    """A trl reward function: the reward model's score of prompt + completion, rendered as in reward training
    (`reward_model_input`), minus `missing_eos_penalty` for completions that never stopped."""

    __name__ = "reward_model"

    def __init__(self, reward_model, tokenizer, stop_ids, missing_eos_penalty=None, suffix_ids=(), micro_batch=None):
        self.model, self.tokenizer, self.stop_ids = reward_model, tokenizer, stop_ids
        self.missing_eos_penalty, self.suffix_ids, self.micro_batch = missing_eos_penalty, suffix_ids, micro_batch

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        inputs = [
            reward_model_input(self.tokenizer.encode(p, add_special_tokens=False), c, self.stop_ids, self.suffix_ids)
            for p, c in zip(prompts, completion_ids)
        ]
        scores = score_sequences(self.model, [ids for ids, _ in inputs], self.tokenizer.pad_token_id, self.micro_batch)
        if self.missing_eos_penalty:
            stopped = torch.tensor([stopped for _, stopped in inputs], device=scores.device)
            scores = scores - self.missing_eos_penalty * (~stopped).float()
        return scores.tolist()
