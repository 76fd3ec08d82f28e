"""Extend a tokenizer with domain vocabulary, so that each medical term is one token.

    python build_domain_tokenizer.py --base_tokenizer_path Qwen/Qwen2.5-0.5B-Instruct \\
        --domain_file_path ./data/vocab/medical_vocab.txt --output_dir ./tokenizer-extended
    python build_domain_tokenizer.py --base_tokenizer_path Qwen/Qwen2.5-0.5B \\
        --domain_file_path ./data/pretrain/medical_articles.txt --vocab_size 500 --output_dir ./tokenizer-learned

`--domain_file_path` is a vocabulary (one term per line; a SentencePiece .vocab file works too) or a raw domain
corpus (.txt lines or pretraining .json/.jsonl), told apart by the file's lines (or `--domain_file_type`); from a
corpus, up to `--vocab_size` frequent multi-character pieces are learned with the `tokenizers` BPE trainer. New
terms become added tokens of the base (fast) tokenizer: the ids of all existing tokens stay the same and text
round-trips exactly (checked on `--eval_file` and the corpus). Printed: how many tokens were added and the tokens
per character before and after on the evaluation text.

Added tokens match anywhere, even inside words, so terms that cannot help are left out (and counted): pure-ASCII
terms (a sub-word fragment such as SentencePiece's continuation piece `pport` would turn "support" into `su` +
`pport`) and terms without letters (symbol runs, numbers). Measure on held-out text with `--eval_file`: when the
extension raises its tokens per character, nothing is written (exit 1) unless `--allow_worse`. Without it, the
figure is measured on the domain file itself, which flatters any extension.

Then train with the new tokenizer; the embeddings grow and each new row starts as the mean of the embeddings of the
sub-tokens it replaces (added_tokens_init.json, written beside the tokenizer, lists them):

    python pretraining.py --model_name_or_path Qwen/Qwen2.5-0.5B --tokenizer_name_or_path ./tokenizer-extended \\
        --use_peft True --modules_to_save embed_tokens,lm_head ... --output_dir outputs-pt-qwen-v1
    python merge_peft_adapter.py --base_model_name_or_path Qwen/Qwen2.5-0.5B \\
        --peft_model_path outputs-pt-qwen-v1 --resize_emb --output_dir merged-pt-qwen-v1
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from medicalgpt.data.validate import load_records
from medicalgpt.data.vocab import (
    INIT_FILE,
    extend_tokenizer,
    filter_terms,
    learn_terms,
    looks_like_vocabulary,
    read_vocabulary,
    round_trip_failures,
    token_sources,
    tokens_per_char,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_tokenizer_path", required=True, help="Hub name or folder of the base tokenizer.")
    parser.add_argument("--domain_file_path", required=True, help="A term list, or a domain corpus.")
    parser.add_argument("--output_dir", required=True, help="Where the extended tokenizer is written.")
    parser.add_argument("--domain_file_type", choices=("auto", "vocab", "corpus"), default="auto")
    parser.add_argument("--vocab_size", type=int, default=1000, help="Corpus: add at most this many tokens.")
    parser.add_argument("--min_frequency", type=int, default=5, help="Corpus: a piece must occur this often.")
    parser.add_argument("--eval_file", nargs="*", default=[], help="Held-out text (.txt/.json/.jsonl) to measure on.")
    parser.add_argument(
        "--allow_worse", action="store_true", help="Write the tokenizer even when --eval_file gets more tokens/char."
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="Run tokenizer code shipped with it.")
    return parser


def read_texts(path: str) -> list[str]:
    """Lines of a .txt file, or the `text` of pretraining .json/.jsonl records (validated, `path:line` errors)."""
    return [record["text"] for record in load_records([path], "pt")]


def save_atomically(tokenizer, sources: dict, output_dir: str) -> None:
    """Write the tokenizer and INIT_FILE to a temporary folder, then move each file into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=output_dir, prefix=".staging-")
    try:
        tokenizer.save_pretrained(staging)
        tokens = ",\n".join(json.dumps(token, ensure_ascii=False) for token in sources.pop("tokens"))
        head = json.dumps(sources, ensure_ascii=False)[:-1]
        with open(os.path.join(staging, INIT_FILE), "w", encoding="utf-8") as f:
            f.write(f'{head}, "tokens": [\n{tokens}\n]}}\n')
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_terms(args, lines: list[str]) -> tuple[str, list[str], int | None, list[str]]:
    """(kind, candidate terms, how many to add at most, corpus texts) of --domain_file_path."""
    kind = args.domain_file_type
    if kind == "auto":
        is_json = args.domain_file_path.endswith((".json", ".jsonl"))
        kind = "vocab" if not is_json and looks_like_vocabulary(lines) else "corpus"
    if kind == "vocab":
        return kind, read_vocabulary(args.domain_file_path), None, []
    corpus = read_texts(args.domain_file_path)
    return kind, learn_terms(corpus, args.vocab_size, args.min_frequency), args.vocab_size, corpus


def check_extension(base, tokenizer, added: list[str], texts: list[str]) -> list[str]:
    """Problems that forbid writing the tokenizer: text that no longer round-trips, terms that are not one token."""
    not_single = [t for t, ids in zip(added, tokenizer(added, add_special_tokens=False)["input_ids"]) if len(ids) != 1]
    failures = round_trip_failures(base, tokenizer, texts + added)
    problems = [f"does not decode back to the same text: {(texts + added)[i][:80]!r}" for i in failures]
    return problems + [f"{term!r} is not one token after the extension" for term in not_single]


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    args = build_parser().parse_args(argv)
    load = dict(trust_remote_code=args.trust_remote_code)
    base = AutoTokenizer.from_pretrained(args.base_tokenizer_path, **load)
    tokenizer = AutoTokenizer.from_pretrained(args.base_tokenizer_path, **load)
    if not tokenizer.is_fast:
        print(f"error: {args.base_tokenizer_path}: not a fast tokenizer (tokenizer.json); added tokens need one")
        return 1
    with open(args.domain_file_path, encoding="utf-8-sig") as f:
        kind, terms, limit, corpus = read_terms(args, f.read().splitlines())
    useful, left_out = filter_terms(terms)
    added, single, broken = extend_tokenizer(tokenizer, useful, limit)
    texts = [text for path in args.eval_file for text in read_texts(path)] or corpus or terms
    problems = check_extension(base, tokenizer, added, texts)
    if problems:
        print("\n".join(f"error: {problem}" for problem in problems[:20]))
        print(f"error: {len(problems)} problems; the extended tokenizer is not written")
        return 1
    print(
        f"{args.domain_file_path}: {kind}, {len(terms)} {'terms' if kind == 'vocab' else 'learned pieces'}; "
        f"{single} already one token; added {len(added)} tokens: {len(base)} -> {len(tokenizer)}"
    )
    for reason, dropped in left_out.items():
        print(f"left out {len(dropped)} terms that cannot help as added tokens, {reason}: {dropped[:10]}")
    if broken:
        print(f"left out {len(broken)} terms that would not decode back as added tokens: {broken[:10]}")
    before, after = tokens_per_char(base, texts), tokens_per_char(tokenizer, texts)
    print(
        f"tokens per character on {len(texts)} texts ({', '.join(args.eval_file) or args.domain_file_path}): "
        f"{before:.4f} -> {after:.4f}"
    )
    if not args.eval_file:
        print("note: measured on the domain file itself; pass --eval_file with held-out text for a fair figure")
    elif after > before and not args.allow_worse:
        print(
            f"error: the extension makes {', '.join(args.eval_file)} longer ({before:.4f} -> {after:.4f} tokens "
            "per character); the extended tokenizer is not written (--allow_worse writes it anyway)"
        )
        return 1
    save_atomically(tokenizer, token_sources(tokenizer, base, added), args.output_dir)
    print(f"Extended tokenizer written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as error:  # DataValidationError included
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
