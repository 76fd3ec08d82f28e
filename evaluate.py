"""Evaluate a model: multiple-choice exam accuracy, perplexity on held-out text, or ROUGE-L / BLEU of open answers.

    python evaluate.py --task choice --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft-qwen-v1 \\
        --template_name qwen --data_file data/eval/choice.jsonl --n_shot 3 --output_dir outputs-eval-choice
    python evaluate.py --task choice --data_file ceval-exam --subjects medical --n_shot 5 --template_name qwen \\
        --compare base=Qwen/Qwen2.5-0.5B-Instruct sft=outputs-sft-qwen-v1 --output_dir outputs-eval-ceval
    python evaluate.py --task qa --base_model merged-sft-qwen-v1 --template_name qwen \\
        --data_file data/eval/qa.jsonl --batch_size 8 --max_new_tokens 256 --output_dir outputs-eval-qa
    python evaluate.py --task perplexity --base_model Qwen/Qwen2.5-0.5B --lora_model outputs-pt-qwen-v1 \\
        --data_file data/eval/perplexity.txt --block_size 512 --stride 256 --output_dir outputs-eval-ppl

choice: JSONL records {"question", "options": {"A": ..., ...} or [...], "answer": "B" or "ACD", "subject"?}, or a
public benchmark's released files read as they ship (--format, detected by default: ceval, cmmlu, mmlu, cmb, cmexam,
medqa, medmcqa, pubmedqa; a folder of per-subject files, or a hub name; --subjects medical; medicalgpt/eval/formats.py
and benchmarks.py). The prediction is the answer the model finds most likely right after the prompt (log-likelihood
of the option letters, or with --choice_target option of their texts): acc, acc_norm and acc_bytes as
lm-evaluation-harness computes them, overall and per subject, with a 95% interval and the accuracy of guessing
beside them. `--choice_mode generate` parses the letter from the model's reply instead, also from an
OpenAI-compatible server (--api_base, --api_key, --model). `--compare NAME=PATH ...` puts several models in one
table (compare.md, compare.json). `--n_shot N` puts N solved items (a folder's dev/ split, else the other items of
the file; same subject first) before each question. `--prompt_format chat` (default) renders the question as a
user turn with the chat template (`--template_name`, else the tokenizer's own), as SFT trained; `plain` writes
`答案：` / `Answer:` after it, for base models.
qa: JSONL records {"question", "answer"}; answers are generated in batches (greedy unless --temperature > 0) and
scored against the references with ROUGE-L F1 and BLEU (0-100; characters for Chinese, words for English).
perplexity: pretraining text (.txt lines, or .json/.jsonl with "text"; a directory is searched), tokenised as
pretraining.py does; windows of --block_size tokens (default as pretraining.py) advance by --stride (default: the
block size, giving pretraining.py's blocks and its eval perplexity; smaller: every token sees at least
block_size - stride tokens of context, for long documents).

Every record is checked before the model loads (errors as `path:line`). Writes results.json and
<task>_predictions.jsonl (one line per item or document) into --output_dir and prints a table. The details of the
scoring are in medicalgpt/eval/choice.py, perplexity.py and qa.py; the file formats in medicalgpt/eval/items.py.
"""

import gc
import logging
import os
import sys

from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.data.files import find_data_files
from medicalgpt.data.validate import load_records
from medicalgpt.errors import UsageError
from medicalgpt.eval.arguments import CHOICE_SETTINGS, EvalChatArguments, EvaluationArguments
from medicalgpt.eval.benchmarks import load_benchmark
from medicalgpt.eval.choice import run_choice, run_choice_generate
from medicalgpt.eval.compare import api_generator, compare_table, model_specs, write_comparison
from medicalgpt.eval.items import load_eval_items
from medicalgpt.eval.perplexity import load_scoring_model, run_perplexity
from medicalgpt.eval.qa import run_qa
from medicalgpt.eval.results import results_table, write_results
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import load_chat_engine

logger = logging.getLogger("medicalgpt")


def main(argv=None):
    chat_args, args = parse_cli((EvalChatArguments, EvaluationArguments), argv, description=__doc__)
    setup_logging()
    if args.compare and args.task != "choice":
        raise UsageError("--compare works with --task choice")
    if not (chat_args.base_model or args.compare or args.api_base):
        raise UsageError("--base_model is required (or --compare, or --api_base with --choice_mode generate)")
    data = load_data(args)
    if args.compare:
        return run_comparison(chat_args, args, data)
    evaluate = {"choice": evaluate_choice, "qa": evaluate_qa, "perplexity": evaluate_perplexity}[args.task]
    metrics, rows = evaluate(chat_args, args, data)
    settings = {"choice": CHOICE_SETTINGS, "qa": (), "perplexity": ()}[args.task]
    results = {
        "task": args.task,
        "base_model": chat_args.base_model,
        "lora_model": chat_args.lora_model,
        "data_file": args.data_file,
        **{key: getattr(args, key) for key in settings},
        **metrics,
    }
    if args.task == "qa":
        results.update(temperature=chat_args.temperature, max_new_tokens=chat_args.max_new_tokens)
    write_results(args.output_dir, args.task, results, rows)
    print(results_table(args.task, metrics))
    logger.info("Results in %s", os.path.join(args.output_dir, "results.json"))
    return results


def evaluate_choice(chat_args, args, benchmark, served=None):
    """One model on the benchmark's items; `served`: the model's name on --api_base."""
    items, shots = benchmark
    if args.choice_mode == "generate":
        if args.api_base:
            name = served or args.model or chat_args.base_model
            generate = api_generator(
                args.api_base, args.api_key, name, chat_args.max_new_tokens, chat_args.temperature
            )
        else:
            engine, options = load_chat_engine(chat_args), chat_args.generation_options()
            generate = lambda conversations: [c.text for c in engine.generate(conversations, options)]  # noqa: E731
        return run_choice_generate(generate, items, args.n_shot, shots, args.batch_size)
    if args.prompt_format == "plain":
        model, tokenizer = load_scoring_model(chat_args)
        encode = None
    else:
        engine = load_chat_engine(chat_args)
        model, tokenizer, encode = engine.model, engine.tokenizer, engine.encode
    return run_choice(model, tokenizer, items, encode, args.n_shot, args.batch_size, True, shots, args.choice_target)


def compare_choice(chat_args, args, benchmark):
    """Each model of --compare in turn -> ({name: metrics}, {name: rows}); nothing written until all are done."""
    metrics, rows = {}, {}
    for name, model_args in model_specs(args.compare, chat_args, args.api_base):
        adapter = f" + {model_args.lora_model}" if model_args.lora_model else ""
        logger.info("Model %s: %s%s", name, model_args.base_model, adapter)
        served = model_args.base_model if args.api_base else None
        metrics[name], rows[name] = evaluate_choice(model_args, args, benchmark, served)
        gc.collect()
    return metrics, rows


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


def load_data(args):
    """Every record checked before any model loads."""
    if args.task == "perplexity":
        data = load_records(find_data_files(args.data_file, "pt"), "pt", args.skip_invalid_examples)
        return data[: args.max_samples]
    if args.task == "choice":
        return load_benchmark(
            args.data_file, args.format, args.split, args.subjects, args.max_samples, args.skip_invalid_examples
        )
    return load_eval_items(args.data_file, args.task, args.max_samples, args.skip_invalid_examples)


def run_comparison(chat_args, args, benchmark):
    metrics, rows = compare_choice(chat_args, args, benchmark)
    settings = {"data_file": args.data_file, **{key: getattr(args, key) for key in CHOICE_SETTINGS}}
    for name in metrics:
        write_results(
            os.path.join(args.output_dir, name), "choice", {"model": name, **settings, **metrics[name]}, rows[name]
        )
    write_comparison(args.output_dir, metrics, {"task": "choice", **settings, "compare": args.compare})
    print(compare_table(metrics))
    logger.info("Comparison in %s", os.path.join(args.output_dir, "compare.md"))
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main))
