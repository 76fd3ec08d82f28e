"""The models PPO trains and reads: the policy and critic in one module, their forwards on left-padded sequences."""

import torch


class PolicyAndValue(torch.nn.Module):
    """Both trained models in one module, so that DDP/DeepSpeed wrap and synchronise them together."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = policy.config  # accelerate sizes DeepSpeed's "auto" ZeRO-3 buckets from config.hidden_size

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        logits = causal_logits(self.policy, input_ids, attention_mask, logits_to_keep)
        return logits, token_values(self.critic, input_ids, attention_mask)


def causal_logits(model, input_ids, attention_mask, logits_to_keep=0):
    """A causal LM's logits for left-padded sequences; only the last `logits_to_keep` positions when non-zero."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep
    ).logits


def token_values(model, input_ids, attention_mask):
    """A sequence-classification model's score head applied at every position: [batch, seq]."""
    seq_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(seq_model, seq_model.base_model_prefix)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return seq_model.score(hidden).squeeze(-1).float()


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def left_pad(sequences, pad_token_id):
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask
