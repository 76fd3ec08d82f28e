"""RL prompts: the token ids of every assistant turn's preceding context in SFT records, as PPO, RLOO and GRPO
roll out from them, and the dataset trl's RLOO / GRPO read them from."""

import logging

from datasets import Dataset

from medicalgpt.rl.exam import reward_columns
from medicalgpt.templates import leading_bos, retokenizable_texts

logger = logging.getLogger(__name__)


def prepare_rl_prompts(records, template, tokenizer, max_source_length, system_prompt=None):
    """Token ids of every prompt in SFT records: each assistant turn's full preceding context, rendered with the
    template up to the generation prompt; the last `max_source_length` tokens are kept."""
    prompts = []
    for record in records:
        system = record.get("system") if record.get("system") is not None else system_prompt
        for index, message in enumerate(record["messages"]):
            if message["role"] not in ("assistant", "function_call"):
                continue
            turns = template.render_turns(record["messages"][:index], system_prompt=system, tools=record.get("tools"))
            text = "".join(p + r for p, r in turns)
            ids = leading_bos(tokenizer, text) + tokenizer.encode(text, add_special_tokens=False)
            prompts.append(ids[-max_source_length:])
    return prompts


def prompt_dataset(tokenizer, prompts, records):
    """trl's dataset: the rendered prompts as text that trl encodes back into the same ids (no second BOS), and for
    exam records the answer and option letters the verifiable rewards read (trl passes every other column to them)."""
    if not prompts:
        return None
    texts, differ = retokenizable_texts(tokenizer, prompts)
    if differ:
        logger.warning("%d of %d RL prompts differ from the template's ids once trl encodes them", differ, len(texts))
    return Dataset.from_dict({"prompt": texts, **reward_columns(records)})
