"""Verifiable rewards for GRPO / RLOO on exam items: rules that score a completion without a reward model.

    choice_accuracy   1.0 when the option letters the answer commits to are exactly the item's answer (every letter
                      of a multi-select item, no other), else 0.0. Read from the answer part only: what follows the
                      think block, or what an <answer>...</answer> tag holds.
    format            1.0 when the completion is Qwen3's thinking-mode structure: a non-empty
                      `<think>\\n...\\n</think>` block, then a non-empty answer, and no other think tag; else 0.0.

Each is a trl reward function: called with the prompts, the completions and the dataset's other columns as keyword
arguments (here `answer`, the correct letters, and `options`, the item's option letters), one float per completion.

How a letter is committed to, in order (the first rule that finds letters decides):
1. a cue, the last one in the answer: "答案：B", "正确答案是 A、C", "The answer is (B)", "Answer: B", "选B";
2. letters leading the answer: "B", "B.", "(B)", "【B】", "AC", "A, C";
3. the whole answer, punctuation aside, is letters: "**B**".
Letters that are not options of the item, or none at all, score 0. Upstream MedicalGPT's accuracy reward parses
LaTeX with math_verify, which almost never matches a free-text or lettered medical answer.
"""

import re

LETTER_RUN = r"[A-Z](?:\s*(?:[,，、/&]|and|和|及)?\s*[A-Z])*"
ANSWER_CUE = re.compile(
    r"(?:(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)s?)\s*(?i:is|are|:|：)?|正确答案|答案|应选|选择|选)"
    r"\s*(?:是|为|应为|应该是)?\s*[:：]?\s*[\(（\[【]?\s*"
    rf"({LETTER_RUN})(?![A-Za-z])"
)
LEADING_LETTERS = re.compile(rf"^[\s*_#>]*[\(（\[【]?\s*({LETTER_RUN})\s*[\)）\]】]?(?![A-Za-z])")
ONLY_LETTERS = re.compile(r"^[\W_]*([A-Z](?:[\W_]*[A-Z])*)[\W_]*$")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_THEN_ANSWER = re.compile(r"^<think>\n?(?P<reasoning>.*?)\n?</think>(?P<answer>.*)$", re.DOTALL)


def completion_text(completion):
    """trl passes plain-text completions, or [{"role": "assistant", "content": ...}] for conversational prompts."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def answer_part(text):
    """What the completion answers: the <answer> tag's content, else what follows the think block. None when a
    think block never closes (the model ran out of tokens while reasoning)."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return None if "<think>" in text else text


def committed_letters(text, options="ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    """The set of option letters an answer commits to (by the rules in the module docstring); None when it names none
    or names a letter that is not an option."""
    answer = answer_part(text)
    if answer is None:
        return None
    cues = ANSWER_CUE.findall(answer)
    found = cues[-1] if cues else None
    for pattern in (LEADING_LETTERS, ONLY_LETTERS):
        if found is None and (match := pattern.search(answer.strip())):
            found = match.group(1)
    if found is None:
        return None
    letters = set(re.findall(r"[A-Z]", found))
    return letters if letters <= set(options) else None


def choice_accuracy(completions, answer, options=None, **kwargs):
    """1.0 per completion whose committed letters equal its item's answer letters exactly, else 0.0."""
    options = options or [None] * len(completions)
    scores = []
    for completion, correct, letters in zip(completions, answer, options):
        committed = committed_letters(completion_text(completion), letters or "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        scores.append(1.0 if committed == set(correct) else 0.0)
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
