"""Multiple-choice scoring as lm-evaluation-harness scores it, and a generative mode for chat models and APIs.

Log-likelihood (the default): each candidate answer is a continuation of the prompt, scored by the sum of its
tokens' log-probabilities. The candidates of a single-answer item are its option letters (`target="letter"`) or
the texts of its options (`target="option"`, lm-eval's "cloze" tasks such as PubMedQA's yes / no / maybe); those
of a k-answer item every set of k letters ("ACD"), so a model is right only when it picks the whole set.
    acc        the most likely candidate is the answer
    acc_norm   the most likely per character of the candidate's text (lm-eval 0.4's acc_norm: len(choice))
    acc_bytes  the most likely per UTF-8 byte of it (lm-eval's acc_bytes)
With letter targets every candidate of an item has the same length, so the three agree; they differ on option
texts. Ties go to the first candidate in option order, as numpy's argmax does. Each accuracy comes with lm-eval's
standard error (sqrt(p(1 - p) / (n - 1))) and a 95% Wilson interval, overall and per subject.

Generate (`run_choice_generate`): the model answers the chat-format prompt and the letter(s) are parsed from the
reply (`parse_choice`, by medicalgpt/answers.py: the reader GRPO's choice_accuracy reward uses); a reply that commits
to no option counts as wrong and is reported as unparsed.
"""

import collections
import itertools
import logging
import math

from medicalgpt.answers import read_answer
from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError
from medicalgpt.eval.items import answer_cue, choice_conversation, choice_text, pick_shots
from medicalgpt.eval.scoring import context_length, next_token_logprobs, pad_id_of, span_logprobs
from medicalgpt.templates import leading_bos

logger = logging.getLogger(__name__)
TARGETS = ("letter", "option")


def candidates_of(item, target="letter"):
    """{candidate: its text}: letters, every k-letter set for k answers, or the options' texts."""
    if target == "option" and len(item["answer"]) == 1:
        return dict(item["options"])
    return {"".join(c): "".join(c) for c in itertools.combinations(item["options"], len(item["answer"]))}


def encode_choice(item, shots, tokenizer, encode=None, target="letter"):
    """(prompt ids, {candidate: continuation ids}). `encode` (ChatEngine.encode) for chat prompts, None for plain."""
    candidates = candidates_of(item, target)
    if encode is not None:
        prompt = encode(choice_conversation(item, shots, target))
        return prompt, {c: tokenizer.encode(text, add_special_tokens=False) for c, text in candidates.items()}
    text, space = choice_text(item, shots, target), answer_cue(item)[1]
    bos = leading_bos(tokenizer, text)
    prompt = bos + tokenizer.encode(text, add_special_tokens=False)
    continuations = {}
    for candidate, answer in candidates.items():
        whole = bos + tokenizer.encode(text + space + answer, add_special_tokens=False)
        prefix_kept = whole[: len(prompt)] == prompt
        continuations[candidate] = (
            whole[len(prompt) :] if prefix_kept else tokenizer.encode(space + answer, add_special_tokens=False)
        )  # a merge across the cue ("：A" as one token): the answer tokenised on its own
    return prompt, continuations


def build_choice_prompts(items, tokenizer, encode, n_shot, max_length, shot_pool=None, target="letter"):
    """Per item (prompt ids, continuations, shots used); shots are dropped while the prompt is too long. An item
    that does not fit even zero-shot is a path:line error."""
    prompts, errors = [], []
    for index, item in enumerate(items):
        shots = pick_shots(items, index, n_shot, shot_pool)
        while True:
            prompt, continuations = encode_choice(item, shots, tokenizer, encode, target)
            longest = len(prompt) + max(len(ids) for ids in continuations.values())
            if longest <= max_length or not shots:
                break
            shots = shots[:-1]
        if longest > max_length:
            path, line = item["source"].rsplit(":", 1)
            message = f"the prompt ({longest} tokens) exceeds the model's context of {max_length} tokens"
            errors.append(Issue(path, int(line) if line.isdigit() else 0, "error", "question", message))
        prompts.append((prompt, continuations, len(shots)))
    if errors:
        raise DataValidationError(errors)
    if n_shot and any(used < n_shot for _, _, used in prompts):
        logger.warning("Fewer than %d shots for some items (too few solved items, or prompts too long).", n_shot)
    return prompts


def score_choices(model, prompts, pad_id, batch_size=8, desc=None):
    """[{candidate: log-likelihood}] per prompt: one forward per prompt when every candidate is one token, one
    per candidate otherwise."""
    single = [i for i, (_, conts, _) in enumerate(prompts) if all(len(ids) == 1 for ids in conts.values())]
    targets = [[ids[0] for ids in prompts[i][1].values()] for i in single]
    scores = [None] * len(prompts)
    found = next_token_logprobs(model, [prompts[i][0] for i in single], targets, pad_id, batch_size, desc)
    for i, values in zip(single, found):
        scores[i] = dict(zip(prompts[i][1], values))
    rest = [(i, candidate) for i in range(len(prompts)) if scores[i] is None for candidate in prompts[i][1]]
    requests = [(prompts[i][0] + prompts[i][1][candidate], len(prompts[i][0])) for i, candidate in rest]
    found = span_logprobs(model, requests, pad_id, batch_size, desc and f"{desc} (multi-token)") if rest else []
    for (i, candidate), values in zip(rest, found):
        scores[i] = {**(scores[i] or {}), candidate: values.sum().item()}
    return scores


def predictions(scores, texts):
    """(acc, acc_norm, acc_bytes) predictions of one item: argmax of the log-likelihood, per character, per byte."""
    first_max = lambda values: max(values, key=values.get)  # noqa: E731  (max keeps the first of equals)
    per_char = {c: s / max(len(texts[c]), 1) for c, s in scores.items()}
    per_byte = {c: s / max(len(texts[c].encode("utf-8")), 1) for c, s in scores.items()}
    return first_max(scores), first_max(per_char), first_max(per_byte)


def run_choice(
    model, tokenizer, items, encode=None, n_shot=0, batch_size=8, progress=True, shot_pool=None, target="letter"
):
    """acc, acc_norm, acc_bytes overall and per subject -> (metrics, per-item rows)."""
    was_training = model.training
    model.eval()
    max_length = context_length(model, tokenizer)
    prompts = build_choice_prompts(items, tokenizer, encode, n_shot, max_length, shot_pool, target)
    try:
        scores = score_choices(model, prompts, pad_id_of(tokenizer), batch_size, "Scoring" if progress else None)
    finally:
        model.train(was_training)
    rows = []
    for item, item_scores, (_, _, shots) in zip(items, scores, prompts):
        texts = candidates_of(item, target)
        prediction, norm, by_bytes = predictions(item_scores, texts)
        answer = item["answer"]
        rounded = {candidate: round(score, 4) for candidate, score in item_scores.items()}
        rows.append(
            {
                **item["record"],
                "source": item["source"],
                "subject": item["subject"],
                "prediction": prediction,
                "correct": prediction == answer,
                "prediction_norm": norm,
                "correct_norm": norm == answer,
                "correct_bytes": by_bytes == answer,
                "scores": rounded,
                "shots": shots,
            }
        )
    return choice_metrics(rows, [len(s) for s in scores]), rows


def choice_metrics(rows, candidate_counts):
    """Overall and per-subject accuracies (acc, acc_norm, acc_bytes), standard error, 95% interval, chance."""
    subjects = collections.defaultdict(list)
    for index, row in enumerate(rows):
        subjects[row.get("subject") or "(no subject)"].append(index)

    def summary(indices):
        correct = sum(rows[i]["correct"] for i in indices)
        n, acc = len(indices), correct / len(indices)
        result = {
            "items": n,
            "correct": correct,
            "accuracy": acc,
            "acc_norm": sum(rows[i].get("correct_norm", rows[i]["correct"]) for i in indices) / n,
            "acc_bytes": sum(rows[i].get("correct_bytes", rows[i]["correct"]) for i in indices) / n,
            "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,
            "ci95": wilson_interval(correct, n),
            "chance": sum(1 / candidate_counts[i] for i in indices) / n,
        }
        return result

    overall = summary(range(len(rows)))
    return {**overall, "subjects": {name: summary(v) for name, v in sorted(subjects.items())}}


def wilson_interval(successes, n, z=1.959964):
    """The 95% Wilson score interval of a proportion (sound for small n and p near 0 or 1)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


# -- generate ----------------------------------------------------------------------------------------------------


def parse_choice(text, item):
    """The letter(s) a reply commits to, sorted, or None: medicalgpt/answers.py, the reader GRPO's choice_accuracy
    uses, so that a reply scores the same in training and here."""
    return read_answer(text, "".join(item["options"]))


def run_choice_generate(generate, items, n_shot=0, shot_pool=None, batch_size=8):
    """`generate(conversations) -> replies`; the letters parsed from each reply -> (metrics, rows)."""
    shots = [pick_shots(items, index, n_shot, shot_pool) for index in range(len(items))]
    conversations = [choice_conversation(item, item_shots) for item, item_shots in zip(items, shots)]
    replies = []
    for start in range(0, len(items), batch_size):
        replies += generate(conversations[start : start + batch_size])
    rows = []
    for item, reply in zip(items, replies):
        prediction = parse_choice(reply, item)
        rows.append(
            {
                **item["record"],
                "source": item["source"],
                "subject": item["subject"],
                "reply": reply,
                "prediction": prediction,
                "correct": prediction == item["answer"],
            }
        )
    metrics = choice_metrics(rows, [len(candidates_of(item)) for item in items])
    metrics["unparsed"] = sum(row["prediction"] is None for row in rows)
    return metrics, rows
