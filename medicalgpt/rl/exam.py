"""Exam items as RL training data, and the share of them a policy answers right.

The items are the multiple-choice files `evaluate.py --task choice` reads (question, options, answer: see
medicalgpt/eval/items.py), checked the same way: every bad item is reported as `path:line` before any model loads.
Each becomes a one-turn SFT-shaped record whose user message is evaluate.py's prompt (instruction in the item's
language, question, options one per line), so that its prompt is rendered with the template like any other RL
prompt; the record keeps the answer letters and the option letters, the columns the verifiable rewards
(medicalgpt/rl/verifiable.py) read.
"""

import torch

from medicalgpt.data.files import find_data_files
from medicalgpt.errors import UsageError
from medicalgpt.eval.items import choice_message, load_eval_items
from medicalgpt.rl import rollout
from medicalgpt.rl.verifiable import choice_accuracy

REWARD_COLUMNS = ("answer", "options")


def exam_record(item):
    """An exam item -> {"messages": [user, assistant], "answer": "AC", "options": "ABCD", "source": "path:line"}."""
    messages = [
        {"role": "user", "content": choice_message(item)},
        {"role": "assistant", "content": item["answer"]},
    ]
    options = "".join(item["options"])
    return {"messages": messages, "answer": item["answer"], "options": options, "source": item["source"]}


def load_exam_records(paths, skip_invalid=False):
    """Exam records of every .json/.jsonl file among `paths` (files, or folders searched recursively), in order."""
    records = []
    for path in find_data_files(paths, "sft"):
        records += [exam_record(item) for item in load_eval_items(path, "choice", skip_invalid=skip_invalid)]
    return records


def load_exam_splits(data_args, training_args):
    """(train, eval) exam records from --train_file_dir and --validation_file_dir; eval is None when not evaluating."""
    if training_args.do_train and not data_args.train_file_dir:
        raise UsageError("--reward_funcs choice_accuracy trains on exam items: pass --train_file_dir")
    skip = data_args.skip_invalid_examples
    train = load_exam_records(data_args.train_file_dir, skip) if data_args.train_file_dir else []
    evaluation = None
    if training_args.do_eval and data_args.validation_file_dir:
        evaluation = load_exam_records(data_args.validation_file_dir, skip)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return train, evaluation


def reward_columns(records):
    """The dataset columns the verifiable rewards read, one value per prompt (exam records have one prompt each);
    none for SFT records."""
    if not records or "answer" not in records[0]:
        return {}
    return {column: [record[column] for record in records] for column in REWARD_COLUMNS}


@torch.no_grad()
def exam_accuracy(model, tokenizer, prompts, records, stop_token_ids, max_new_tokens, batch_size=16):
    """The share of exam `records` the model answers right (choice_accuracy), decoding greedily from `prompts`
    (their rendered prompts' token ids, in the same order)."""
    generation = rollout.sampling_config(max_new_tokens, stop_token_ids, tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        queries = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        responses = rollout.generate_responses(model, queries, mask, generation, len(batch))
        completions += tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = choice_accuracy(completions, **reward_columns(records))
    return sum(scores) / len(scores)
