"""evaluate.py --task perplexity, and the model it scores (also for plain-format choice prompts).

Documents are tokenised as pretraining.py tokenises them (tokenizer(text) + EOS, concatenated). Windows of
`block_size` tokens advance by `stride`; each scores the tokens the previous windows did not, so every token but the
first is scored once, with at least block_size - stride tokens of context. With stride = block_size (the default)
the windows are pretraining.py's blocks, and the perplexity is exp(eval_loss) of `pretraining.py --do_eval` on the
same text: exactly when every block is full (the Trainer averages a shorter block per batch; pretraining.py also
cuts each 1000 documents apart).
"""

import logging
import math

import torch
from tqdm import tqdm

from medicalgpt.errors import UsageError
from medicalgpt.eval.scoring import pad_id_of, span_logprobs

logger = logging.getLogger(__name__)


def load_scoring_model(chat_args):
    """(model, tokenizer) of --base_model (+ --lora_model, merged), as load_chat_engine loads them, with no
    conversation template needed (perplexity and plain-format prompts work on base models without one)."""
    from medicalgpt.model.adapter import read_adapter_base
    from medicalgpt.model.loader import load_model, load_model_with_adapter, load_tokenizer
    from medicalgpt.serve.chat import tokenizer_source

    model_args = chat_args.model_arguments()
    if chat_args.lora_model and not read_adapter_base(chat_args.lora_model):
        raise UsageError(f"--lora_model {chat_args.lora_model}: not a LoRA adapter directory (no adapter_config.json)")
    tokenizer = load_tokenizer(model_args, tokenizer_source(chat_args))
    if chat_args.lora_model:
        model = load_model_with_adapter(model_args, chat_args.lora_model, tokenizer=tokenizer)
    else:
        model = load_model(model_args)
    return model.eval(), tokenizer


def tokenize_documents(tokenizer, texts, progress=True):
    """As pretraining.py (medicalgpt.processors.pt.prepare_pretraining_dataset): tokenizer(text) + EOS, per text."""
    if tokenizer.eos_token_id is None:
        raise UsageError("The tokenizer has no EOS token to end documents with.")
    documents = []
    for start in tqdm(range(0, len(texts), 1000), desc="Tokenising", unit="1000 docs", disable=not progress):
        ids = tokenizer(texts[start : start + 1000], add_special_tokens=True)["input_ids"]
        documents += [doc + [tokenizer.eos_token_id] for doc in ids]
    return documents


def perplexity_windows(length, window, stride):
    """[(begin, end, first)]: windows [begin, end) over `length` tokens, each scoring positions [first, end)."""
    windows, scored_to = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        first = max(scored_to, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        scored_to = end
        if end == length:
            break
    return windows


def run_perplexity(model, tokenizer, records, block_size, stride=None, batch_size=8, progress=True):
    """Perplexity of the documents as one stream -> (metrics, a row per document)."""
    stride = stride or block_size
    documents = tokenize_documents(tokenizer, [record["text"] for record in records], progress)
    stream = torch.tensor([token for doc in documents for token in doc], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(documents)), torch.tensor([len(doc) for doc in documents]))
    windows = perplexity_windows(len(stream), block_size, stride)
    requests = [(stream[begin:end], first - begin) for begin, end, first in windows]
    found = span_logprobs(model, requests, pad_id_of(tokenizer), batch_size, "Scoring" if progress else None)
    nll, count = torch.zeros(len(documents), dtype=torch.float64), torch.zeros(len(documents), dtype=torch.long)
    for (_, end, first), logprobs in zip(windows, found):
        nll.index_add_(0, owner[first:end], -logprobs)
        count.index_add_(0, owner[first:end], torch.ones(end - first, dtype=torch.long))
    tokens = int(count.sum())
    if not tokens:
        raise UsageError("Too little text: no token has a token before it to be predicted from.")
    loss = nll.sum().item() / tokens
    metrics = {
        "perplexity": math.exp(min(loss, 50)),
        "loss": loss,
        "tokens": tokens,
        "documents": len(documents),
        "windows": len(windows),
        "block_size": block_size,
        "stride": stride,
    }
    rows = [
        {
            "source": record.get("source"),
            "tokens": int(n),
            "loss": (s / n if n else None),
            "perplexity": (math.exp(min(s / n, 50)) if n else None),
        }
        for record, s, n in zip(records, nll.tolist(), count.tolist())
    ]
    return metrics, rows
