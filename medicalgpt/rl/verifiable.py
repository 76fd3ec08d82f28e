"""Verifiable rewards for GRPO / RLOO on exam items: rules that score a completion without a reward model.

    choice_accuracy   1.0 when the option letters the answer commits to are exactly the item's answer (every letter
                      of a multi-select item, no other), else 0.0 (medicalgpt/answers.py reads them).
    format            1.0 when the completion is Qwen3's thinking-mode structure: a non-empty
                      `<think>\\n...\\n</think>` block, then a non-empty answer, and no other think tag; else 0.0.

Each is a trl reward function: called with the prompts, the completions and the dataset's other columns as keyword
arguments (here `answer`, the correct letters, and `options`, the item's option letters), one float per completion.

The letters an answer commits to are read by medicalgpt/answers.py, the reader evaluate.py's generate mode uses too:
reasoning in a closed think block ignored (an unclosed one is no answer), <answer> tags, the first final-answer cue,
negated mentions ("A选项错误", "A is wrong") never counted. Upstream MedicalGPT's accuracy reward parses LaTeX with
math_verify, which almost never matches a free-text or lettered medical answer.
"""

import re

from medicalgpt.answers import ALL_LETTERS, read_answer

THINK_THEN_ANSWER = re.compile(r"^<think>\n?(?P<reasoning>.*?)\n?</think>(?P<answer>.*)$", re.DOTALL)


def completion_text(completion):
    """trl passes plain-text completions, or [{"role": "assistant", "content": ...}] for conversational prompts."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def choice_accuracy(completions, answer, options=None, **kwargs):
    """1.0 per completion whose committed letters equal its item's answer letters exactly, else 0.0."""
    options = options or [None] * len(completions)
    scores = []
    for completion, correct, letters in zip(completions, answer, options):
        committed = read_answer(completion_text(completion), letters or ALL_LETTERS)
        scores.append(1.0 if committed is not None and set(committed) == set(correct) else 0.0)
    return scores


def has_think_format(text):
    """Qwen3's thinking-mode answer: `<think>` reasoning `</think>` then the answer, both non-empty, one block."""
    match = THINK_THEN_ANSWER.match(text.lstrip())
    if match is None:
        return False
    reasoning, answer = match.group("reasoning"), match.group("answer")
    single_block = "<think>" not in reasoning and "<think>" not in answer and "</think>" not in answer
    return single_block and bool(reasoning.strip()) and bool(answer.strip())


def format_reward(completions, **kwargs):
    """1.0 per completion in Qwen3's think-then-answer structure, else 0.0."""
    return [1.0 if has_think_format(completion_text(c)) else 0.0 for c in completions]


# trl logs each reward as rewards/<function __name__>/mean: the flag's name
format_reward.__name__ = "format"

VERIFIABLE_REWARDS = {"choice_accuracy": choice_accuracy, "format": format_reward}
