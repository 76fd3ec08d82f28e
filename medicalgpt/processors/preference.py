"""Preference records -> prompt, chosen and rejected token ids (reward modeling, DPO, ORPO)."""

import logging

from medicalgpt.templates import leading_bos

logger = logging.getLogger(__name__)


def tokenize_preference(record, template, tokenizer, max_source_length, max_target_length, system_prompt=None):
    """One normalised preference record -> prompt_ids, chosen_ids, rejected_ids (responses end with the stop token).

    The prompt keeps its last `max_source_length` tokens, each response its first `max_target_length`."""
    system = record.get("system")
    turns = template.render_turns(
        record["messages"], system_prompt=system if system is not None else system_prompt, tools=record.get("tools")
    )
    prompt = "".join(p + r for p, r in turns)
    prompt_ids = leading_bos(tokenizer, prompt) + tokenizer.encode(prompt, add_special_tokens=False)
    chosen_ids = tokenizer.encode(record["chosen"] + template.stop_str, add_special_tokens=False)
    rejected_ids = tokenizer.encode(record["rejected"] + template.stop_str, add_special_tokens=False)
    truncated = len(prompt_ids) > max_source_length or max(len(chosen_ids), len(rejected_ids)) > max_target_length
    return {
        "prompt_ids": prompt_ids[-max_source_length:],
        "chosen_ids": chosen_ids[:max_target_length],
        "rejected_ids": rejected_ids[:max_target_length],
        "truncated": truncated,
    }


def prepare_preference_dataset(
    dataset, template, tokenizer, max_source_length, max_target_length, system_prompt=None, num_proc=None, desc=""
):
    """Dataset of normalised preference records -> {"prompt_ids", "chosen_ids", "rejected_ids"}."""

    def tokenize(record):
        return tokenize_preference(record, template, tokenizer, max_source_length, max_target_length, system_prompt)

    dataset = dataset.map(
        tokenize, num_proc=num_proc, remove_columns=dataset.column_names, desc=f"Tokenising preference pairs{desc}"
    )
    truncated = sum(dataset["truncated"])
    if truncated:
        logger.warning(
            "%d of %d pairs were truncated to --max_source_length %d / --max_target_length %d tokens.",
            truncated,
            len(dataset),
            max_source_length,
            max_target_length,
        )
    return dataset.remove_columns("truncated")
