"""evaluate.py --task qa: open answers generated and scored.

Answers are generated in batches by the chat engine (greedy by default) and compared with the references: ROUGE-L F1
and BLEU, on characters for Chinese and words for English, 0-100 (medicalgpt/eval/text_metrics.py).
"""

from tqdm import tqdm

from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError
from medicalgpt.eval.text_metrics import text_scores


def check_qa_prompts(engine, items, max_new_tokens):
    errors = []
    for item in items:
        try:
            engine.check_length(len(engine.encode([{"role": "user", "content": item["question"]}])), max_new_tokens)
        except ValueError as error:
            path, line = item["source"].rsplit(":", 1)
            errors.append(Issue(path, int(line), "error", "question", str(error)))
    if errors:
        raise DataValidationError(errors)


def run_qa(engine, items, options, batch_size=8, progress=True):
    """Generate an answer per question and compare it with the reference -> (metrics, per-item rows)."""
    check_qa_prompts(engine, items, options.max_new_tokens)
    completions = []
    for start in tqdm(range(0, len(items), batch_size), desc="Generating", unit="batch", disable=not progress):
        batch = items[start : start + batch_size]
        completions += engine.generate([[{"role": "user", "content": item["question"]}] for item in batch], options)
    predictions = [completion.text.strip() for completion in completions]
    rouge, bleu, metrics = text_scores(predictions, [item["answer"] for item in items])
    truncated = sum(completion.finish_reason == "length" for completion in completions)
    metrics = {**metrics, "items": len(items), "truncated": truncated}
    rows = [
        {
            **item["record"],
            "source": item["source"],
            "prediction": prediction,
            "rouge_l": round(r, 2),
            "bleu": round(b, 2),
            "finish_reason": completion.finish_reason,
        }
        for item, prediction, r, b, completion in zip(items, predictions, rouge, bleu, completions)
    ]
    return metrics, rows
