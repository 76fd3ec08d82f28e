"""Evaluate a model: multiple-choice exam accuracy, perplexity on held-out text, or ROUGE-L / BLEU of open answers.

    python evaluate.py --task choice --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 \\
        --template_name qwen --data_file data/eval/choice.jsonl --n_shot 3 --output_dir outputs-eval-choice
    python evaluate.py --task qa --base_model merged-sft-qwen-v1 --template_name qwen \\
        --data_file data/eval/qa.jsonl --batch_size 8 --max_new_tokens 256 --output_dir outputs-eval-qa
    python evaluate.py --task perplexity --base_model Qwen/Qwen2.5-0.5B --lora_model outputs-pt-qwen-v1 \\
        --data_file data/eval/perplexity.txt --block_size 512 --stride 256 --output_dir outputs-eval-ppl

choice: JSONL records {"question", "options": {"A": ..., ...} or [...], "answer": "B" or "ACD", "subject"?}, the
shape of public exams such as CMExam, CMB or MedQA once converted (README: Evaluation). The prediction is the answer
the model finds most likely right after the prompt (log-likelihood of the option letters); accuracy overall and per
subject, with the accuracy of guessing beside it. `--n_shot N` puts N solved items of the same file (same subject
first) before each question. `--prompt_format chat` (default) renders the question as a user turn with the chat
template (`--template_name`, else the tokenizer's own), as SFT trained; `plain` writes `答案：` / `Answer:` after
it, for base models.
qa: JSONL records {"question", "answer"}; answers are generated in batches (greedy unless --temperature > 0) and
scored against the references with ROUGE-L F1 and BLEU (0-100; characters for Chinese, words for English).
perplexity: pretraining text (.txt lines, or .json/.jsonl with "text"; a directory is searched), tokenised as
pretraining.py does; windows of --block_size tokens (default as pretraining.py) advance by --stride (default: the
block size, giving pretraining.py's blocks and its eval perplexity; smaller: every token sees at least
block_size - stride tokens of context, for long documents).

Every record is checked before the model loads (errors as `path:line`). Writes results.json and
<task>_predictions.jsonl (one line per item or document) into --output_dir and prints a table. The details of the
scoring are in medicalgpt/eval/tasks.py; the file formats in medicalgpt/eval/items.py.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from medicalgpt.cli import UsageError, run_cli, setup_logging
from medicalgpt.data.files import find_data_files
from medicalgpt.data.validate import load_records
from medicalgpt.eval.items import load_eval_items
from medicalgpt.eval.tasks import load_scoring_model, run_choice, run_perplexity, run_qa
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import ChatArguments, load_chat_engine

logger = logging.getLogger("medicalgpt")
TASKS = ("choice", "qa", "perplexity")
FORMATS = ("chat", "plain")


@dataclass
class EvalChatArguments(ChatArguments):
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer (qa)."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of qa answers; 0 (default) = greedy, reproducible."}
    )


@dataclass
class EvaluationArguments:
    task: str = field(metadata={"help": "What to measure.", "choices": TASKS})
    data_file: str = field(metadata={"help": "Items to evaluate on (see above); a directory for perplexity."})
    output_dir: str = field(default="outputs-eval", metadata={"help": "Where results.json and predictions go."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward / generate call."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N items only."})
    skip_invalid_examples: bool = field(
        default=False, metadata={"help": "Skip and count invalid records instead of stopping at them."}
    )
    n_shot: int = field(default=0, metadata={"help": "choice: solved examples before each question."})
    prompt_format: str = field(
        default="chat",
        metadata={"help": "choice: chat (template) or plain (base models).", "choices": ("chat", "plain")},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "perplexity: window in tokens (default: min(1024, model_max_length), as PT)."}
    )
    stride: int | None = field(
        default=None, metadata={"help": "perplexity: tokens a window advances by (default: block_size, no overlap)."}
    )

    def __post_init__(self):
        if self.batch_size < 1 or self.n_shot < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("--batch_size and --max_samples must be at least 1, --n_shot at least 0")
        if (self.block_size is not None and self.block_size < 2) or (self.stride is not None and self.stride < 1):
            raise ValueError("--block_size must be at least 2 and --stride at least 1")
        if self.stride and self.block_size and self.stride > self.block_size:
            raise ValueError("--stride must not exceed --block_size: tokens between windows would never be scored")


def evaluate_choice(chat_args, args, items):
    if args.prompt_format == "plain":
        model, tokenizer = load_scoring_model(chat_args)
        return run_choice(model, tokenizer, items, None, args.n_shot, args.batch_size)
    engine = load_chat_engine(chat_args)
    return run_choice(engine.model, engine.tokenizer, items, engine.encode, args.n_shot, args.batch_size)


def evaluate_perplexity(chat_args, args, records):
    model, tokenizer = load_scoring_model(chat_args)
    block_size = args.block_size or min(1024, tokenizer.model_max_length)
    if args.stride and args.stride > block_size:
        raise UsageError(f"--stride {args.stride} exceeds the block size {block_size}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and block_size > limit:
        raise UsageError(f"--block_size {block_size} exceeds the model's context of {limit} tokens")
    return run_perplexity(model, tokenizer, records, block_size, args.stride, args.batch_size)


def evaluate_qa(chat_args, args, items):
    engine = load_chat_engine(chat_args)
    return run_qa(engine, items, chat_args.generation_options(), args.batch_size)


def write_results(output_dir, task, results, rows):
    """results.json and <task>_predictions.jsonl, each written whole under a temporary name, then renamed."""
    os.makedirs(output_dir, exist_ok=True)
    outputs = {
        f"{task}_predictions.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        "results.json": json.dumps(results, ensure_ascii=False, indent=2) + "\n",
    }
    for name, text in outputs.items():
        path = os.path.join(output_dir, name)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".partial", path)


def results_table(task, m):
    if task == "choice":
        rows = [("subject", "items", "accuracy")]
        rows += [(name, s["items"], f"{s['accuracy']:.4f}") for name, s in m["subjects"].items()]
        rows += [("all", m["items"], f"{m['accuracy']:.4f}"), ("chance (guessing)", "", f"{m['chance']:.4f}")]
    elif task == "qa":
        rows = [("items", "ROUGE-L", "BLEU"), (m["items"], f"{m['rouge_l']:.2f}", f"{m['bleu']:.2f}")]
    else:
        rows = [("documents", "tokens", "loss", "perplexity")]
        rows += [(m["documents"], m["tokens"], f"{m['loss']:.4f}", f"{m['perplexity']:.4f}")]
    rows = [[str(cell) for cell in row] for row in rows]
    width = [max(_columns(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c + " " * (w - _columns(c)) for c, w in zip(row, width)).rstrip() for row in rows)


def _columns(text):
    return sum(2 if "\u2e80" <= char <= "\u9fff" or "\uff00" <= char <= "\uffef" else 1 for char in text)


def main(argv=None):
    chat_args, args = parse_cli((EvalChatArguments, EvaluationArguments), argv, description=__doc__)
    setup_logging()
    if args.task == "perplexity":  # every record is checked before the model loads
        data = load_records(find_data_files(args.data_file, "pt"), "pt", args.skip_invalid_examples)
        data = data[: args.max_samples]
    else:
        data = load_eval_items(args.data_file, args.task, args.max_samples, args.skip_invalid_examples)
    evaluate = {"choice": evaluate_choice, "qa": evaluate_qa, "perplexity": evaluate_perplexity}[args.task]
    metrics, rows = evaluate(chat_args, args, data)
    settings = {"choice": ("n_shot", "prompt_format"), "qa": (), "perplexity": ()}[args.task]
    results = {"task": args.task, "base_model": chat_args.base_model, "lora_model": chat_args.lora_model,
               "data_file": args.data_file, **{key: getattr(args, key) for key in settings}, **metrics}  # fmt: skip
    if args.task == "qa":
        results.update(temperature=chat_args.temperature, max_new_tokens=chat_args.max_new_tokens)
    write_results(args.output_dir, args.task, results, rows)
    print(results_table(args.task, metrics))
    logger.info("Results in %s", os.path.join(args.output_dir, "results.json"))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
