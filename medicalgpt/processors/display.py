"""A tokenised example shown as text, its learned spans marked (SFT logs one; validate_jsonl.py --show)."""

from medicalgpt.constants import IGNORE_INDEX


def format_label_mask(input_ids, labels, tokenizer, start="[LEARN]", end="[/LEARN]"):
    """Decoded text with the supervised spans marked, e.g. `...assistant\n[LEARN]Hello<|im_end|>[/LEARN]...`."""
    pieces, span, learning = [], [], None
    for token_id, label in zip(input_ids, labels):
        is_learned = label != IGNORE_INDEX
        if learning is not None and is_learned != learning:
            pieces.append(_decorate(tokenizer.decode(span), learning, start, end))
            span = []
        span.append(token_id)
        learning = is_learned
    if span:
        pieces.append(_decorate(tokenizer.decode(span), learning, start, end))
    return "".join(pieces)


def _decorate(text, learned, start, end):
    return f"{start}{text}{end}" if learned else text
