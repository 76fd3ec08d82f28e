"""Extend a tokenizer with domain terms.

Terms are added to the (fast) tokenizer as added tokens: each term becomes one token wherever it appears (the
longest match wins), text round-trips exactly, and the ids of everything else are unchanged. Terms that already
are one token are left alone. build_domain_tokenizer.py writes, beside the tokenizer, `added_tokens_init.json`:
each new token with the base tokenizer's ids for the same text.

The model's embeddings for the new tokens are medicalgpt.model.embeddings' job.
"""

from __future__ import annotations

import copy
import logging
import unicodedata

logger = logging.getLogger(__name__)

INIT_FILE = "added_tokens_init.json"
SENTENCEPIECE_SPACE = "\u2581"  # SentencePiece's word-boundary mark in .vocab files
SENTENCE_PUNCTUATION = set("，。；：！？,.;:!?、")


def read_vocabulary(path: str) -> list[str]:
    """Terms of a vocabulary file: one per line, anything after a tab ignored (so a SentencePiece .vocab file
    works: its ▁ marks are removed, its <control> pieces skipped), NFC-normalised, duplicates dropped."""
    terms = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            term = unicodedata.normalize("NFC", line.split("\t")[0].replace(SENTENCEPIECE_SPACE, " ").strip())
            if term and not (term.startswith("<") and term.endswith(">")):
                terms.append(term)
    return list(dict.fromkeys(terms))


def looks_like_vocabulary(lines: list[str]) -> bool:
    """True when nearly every line is one short term (no sentence punctuation), as in a term list; False for a
    corpus of sentences."""
    firsts = [line.split("\t")[0].strip() for line in lines if line.strip()]
    terms = sum(len(t) <= 24 and not SENTENCE_PUNCTUATION & set(t) for t in firsts)
    return bool(firsts) and terms >= 0.9 * len(firsts)


def learn_terms(texts: list[str], max_terms: int, min_frequency: int = 5) -> list[str]:
    """Frequent multi-character pieces of a corpus, most frequent merges first, learned with the `tokenizers` BPE
    trainer (pre-split on whitespace, punctuation, digits and script changes). At most 4 * max_terms candidates."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.NFC()
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.UnicodeScripts()]
    )
    alphabet = len({char for text in texts for char in unicodedata.normalize("NFC", text) if not char.isspace()})
    trainer = trainers.BpeTrainer(
        vocab_size=alphabet + 4 * max_terms, min_frequency=min_frequency, show_progress=False
    )
    learner.train_from_iterator(texts, trainer)
    pieces = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    return [piece for piece, _ in pieces if len(piece) > 1 and piece.isalpha()]


def filter_terms(terms: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(terms worth adding, {reason: terms left out}). Added tokens match anywhere, even inside a word, so a
    pure-ASCII term cannot help: a sub-word fragment such as a SentencePiece continuation piece ('pport') splits
    every word that contains it ('support' -> 'su', 'pport'), and a whole English word is either one token with its
    leading space already or splits off its space. A term without any letter (symbol runs, bare numbers) cuts
    through numbers and punctuation the same way."""
    kept, left_out = [], {"pure ASCII (would match inside English words)": [], "no letters (symbols, numbers)": []}
    reasons = list(left_out)
    for term in terms:
        if term.isascii():
            left_out[reasons[0]].append(term)
        elif not any(unicodedata.category(char).startswith("L") for char in term):
            left_out[reasons[1]].append(term)
        else:
            kept.append(term)
    return kept, {reason: dropped for reason, dropped in left_out.items() if dropped}


def extend_tokenizer(tokenizer, terms: list[str], limit: int | None = None) -> tuple[list[str], int, list[str]]:
    """Add the terms that are not one token yet (at most `limit`) as added tokens. Returns (added terms, how many
    already were one token, terms left out because they would not decode back: a byte-level decoder turns an added
    token made only of its byte alphabet, such as 'és', into raw bytes)."""
    from tokenizers import AddedToken

    lengths = tokenizer(terms, add_special_tokens=False)["input_ids"] if terms else []
    existing = set(tokenizer.get_vocab())
    new, single = [], 0
    for term, ids in zip(terms, lengths):
        if len(ids) == 1 or term in existing:
            single += 1
        elif term.isascii() and len(tokenizer.encode(" " + term, add_special_tokens=False)) == 1:
            single += 1  # an English word the tokenizer holds with its leading space: adding it would split that
        else:
            new.append(term)
    trial = copy.deepcopy(tokenizer)
    trial.add_tokens([AddedToken(term, normalized=True, special=False) for term in new])
    decoded = trial.batch_decode([[trial.convert_tokens_to_ids(term)] for term in new])
    broken = [term for term, text in zip(new, decoded) if text != term]
    new = [term for term, text in zip(new, decoded) if text == term][:limit]
    tokenizer.add_tokens([AddedToken(term, normalized=True, special=False) for term in new])
    return new, single, broken


def token_sources(tokenizer, base_tokenizer, terms: list[str]) -> dict:
    """What build_domain_tokenizer.py writes to INIT_FILE: each new token's id and its base tokenizer ids."""
    base_ids = base_tokenizer(terms, add_special_tokens=False)["input_ids"] if terms else []
    return {
        "base_tokenizer": base_tokenizer.name_or_path,
        "base_vocab_size": len(base_tokenizer),
        "tokens": [
            {"token": term, "id": tokenizer.convert_tokens_to_ids(term), "base_ids": ids}
            for term, ids in zip(terms, base_ids)
        ],
    }


def tokens_per_char(tokenizer, texts: list[str]) -> float:
    chars = sum(len(text) for text in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return tokens / chars if chars else 0.0


def round_trip_failures(base_tokenizer, tokenizer, texts: list[str]) -> list[int]:
    """Indexes of texts that decode back exactly with the base tokenizer but not with the extended one."""

    def decoded(tok):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return tok.batch_decode(ids, clean_up_tokenization_spaces=False)

    return [
        i for i, (a, b, text) in enumerate(zip(decoded(base_tokenizer), decoded(tokenizer), texts)) if a == text != b
    ]
