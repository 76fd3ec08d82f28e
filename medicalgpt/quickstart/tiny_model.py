"""Build a tiny, randomly initialised Qwen2-style model and a BPE tokenizer offline, from the project's sample data.

    python -m medicalgpt.quickstart.tiny_model --output_dir models/tiny-qwen  # 2 layers, hidden 64 (tests, quickstart)
    python -m medicalgpt.quickstart.tiny_model --output_dir models/small --hidden_size 256 --num_layers 4  # benchmarks

The tokenizer is trained with Qwen2's pre-tokenizer, has Qwen2.5-Instruct's special tokens and chat template, and
loads as a `Qwen2Tokenizer`, so the whole pipeline runs exactly as it would on Qwen2.5, only smaller.
"""

import argparse
import glob
import json
import os
from importlib import resources

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_CORPUS = ["data/pretrain/*.txt", "data/finetune/*.jsonl", "data/reward/*.jsonl"]


def iter_corpus_lines(patterns):
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield _text_of(line) if path.endswith((".json", ".jsonl")) else line


def _text_of(line):
    try:
        return json.dumps(json.loads(line), ensure_ascii=False)
    except json.JSONDecodeError:
        return line


def train_bpe(lines, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return json.loads(tokenizer.to_str())["model"]


def build_tokenizer(corpus_patterns=DEFAULT_CORPUS, vocab_size=3000):
    from transformers import Qwen2Tokenizer

    bpe = train_bpe(list(iter_corpus_lines(corpus_patterns)), vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (resources.files("trl") / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    return tokenizer


def build_tiny_model(
    output_dir, corpus_patterns=DEFAULT_CORPUS, vocab_size=3000, hidden_size=64, num_layers=2, seed=0
):
    """Write a tokenizer and a randomly initialised Qwen2 causal LM to `output_dir`; returns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(corpus_patterns, vocab_size)
    heads = max(4, hidden_size // 64)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 if hidden_size < 128 else hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/tiny-qwen")
    parser.add_argument("--corpus", nargs="+", default=DEFAULT_CORPUS, help="Glob patterns of training text")
    parser.add_argument("--vocab_size", type=int, default=3000)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args(argv)
    build_tiny_model(args.output_dir, args.corpus, args.vocab_size, args.hidden_size, args.num_layers)
    print(f"Tiny model and tokenizer written to {args.output_dir}")


if __name__ == "__main__":
    main()
