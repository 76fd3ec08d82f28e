"""Log-likelihoods of token sequences under a causal LM, in batches of left-padded rows: the primitives of the choice
and perplexity tasks."""

import inspect

import torch
from tqdm import tqdm


def context_length(model, tokenizer):
    return getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length


def pad_id_of(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# -- scoring token sequences -------------------------------------------------------------------------------------


def _logits(model, sequences, pad_id, keep):
    """Logits at the last `keep` positions of left-padded `sequences` (position ids restart at each row's first
    real token). Models that take `logits_to_keep` never build the [batch, tokens, vocab] logits of the rest."""
    width = max(len(ids) for ids in sequences)
    rows = [torch.as_tensor(ids, dtype=torch.long) for ids in sequences]
    input_ids = torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    kwargs = {key: value.to(model.device) for key, value in kwargs.items()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs, use_cache=False).logits[:, -keep:]


def _batches(lengths, batch_size):
    """Indices in batches of similar lengths (longest first: an out-of-memory error comes at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def next_token_logprobs(model, prompts, targets, pad_id, batch_size=8, desc=None):
    """log p(token | prompt) for each token id of targets[i] after prompts[i]; one forward per prompt."""
    results = [None] * len(prompts)
    for batch in tqdm(_batches([len(p) for p in prompts], batch_size), desc=desc, unit="batch", disable=not desc):
        logprobs = torch.log_softmax(_logits(model, [prompts[i] for i in batch], pad_id, 1)[:, 0].float(), -1)
        for row, i in enumerate(batch):
            results[i] = logprobs[row, targets[i]].tolist()
    return results


@torch.inference_mode()
def span_logprobs(model, requests, pad_id, batch_size=8, desc=None):
    """requests: [(ids, start)] -> per request, a float64 tensor of log p(ids[t] | ids[:t]) for start <= t < len."""
    results = [None] * len(requests)
    for batch in tqdm(_batches([len(r[0]) for r in requests], batch_size), desc=desc, unit="batch", disable=not desc):
        keep = max(len(requests[i][0]) - requests[i][1] for i in batch) + 1  # rows end together (left padding)
        logits = _logits(model, [requests[i][0] for i in batch], pad_id, keep)
        for row, i in enumerate(batch):
            ids, start = torch.as_tensor(requests[i][0], dtype=torch.long), requests[i][1]
            scored = len(ids) - start  # predicted by the logits at the `scored` positions before the last
            scores = torch.log_softmax(logits[row, keep - 1 - scored : keep - 1].float(), -1)
            results[i] = scores.gather(-1, ids[start:, None].to(scores.device))[:, 0].double().cpu()
    return results
