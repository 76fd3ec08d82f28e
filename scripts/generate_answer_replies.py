"""Replies a real instruct model writes to the project's exam items, for the answer reader's labelled corpus.

    python scripts/generate_answer_replies.py --model models/smollm2-135m-instruct \\
        --output tests/assets/answers/smollm2_raw.jsonl

Each exam item of data/ (Chinese and English) is asked as evaluate.py --choice_mode generate asks it (the item's
prompt, the model's own chat template), once plainly and once asking for a short explanation, and sampled
--samples times (temperature 0.9, top_p 0.95, --seed; --batch_size prompts per generate call, one torch thread):
one JSONL line per reply with the item's option letters and its answer. The replies are unlabelled: a person labels
each (tests/assets/answers/smollm2.jsonl) by the rules of medicalgpt/answers.py, ambiguous ones as none.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medicalgpt.eval.benchmarks import load_benchmark  # noqa: E402
from medicalgpt.eval.items import choice_message  # noqa: E402
from medicalgpt.eval.text_metrics import is_chinese  # noqa: E402
from medicalgpt.serve.chat import ChatArguments, load_chat_engine  # noqa: E402

SOURCES = [
    "data/eval/medqa",
    "data/eval/mmlu",
    "data/eval/medmcqa",
    "data/eval/pubmedqa",
    "data/eval/choice.jsonl",
    "data/grpo/train.jsonl",
    "data/eval/cmexam",
]
EXPLAIN = {"en": "Explain your reasoning briefly, then give the answer.", "zh": "请简要说明理由，再给出答案。"}


def exam_prompts(english_items, chinese_items):
    """(item, language, style, conversation) for the first `english_items` English and `chinese_items` Chinese items,
    each asked plainly and with a request for an explanation."""
    items = [item for source in SOURCES for item in load_benchmark(source)[0]]
    english = [item for item in items if not is_chinese(item["question"])][:english_items]
    chinese = [item for item in items if is_chinese(item["question"])][:chinese_items]
    prompts = []
    for item in english + chinese:
        language = "zh" if is_chinese(item["question"]) else "en"
        for style in ("plain", "explain"):
            message = choice_message(item) + ("\n" + EXPLAIN[language] if style == "explain" else "")
            prompts.append((item, language, style, [{"role": "user", "content": message}]))
    return prompts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--output", default="tests/assets/answers/smollm2_raw.jsonl")
    parser.add_argument("--english_items", type=int, default=14)
    parser.add_argument("--chinese_items", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fast on a shared machine)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    chat = ChatArguments(
        base_model=args.model, temperature=0.9, top_p=0.95, max_new_tokens=args.max_new_tokens, use_cpu=True
    )
    engine, options = load_chat_engine(chat), chat.generation_options()
    asked = [prompt for prompt in exam_prompts(args.english_items, args.chinese_items) for _ in range(args.samples)]
    rows = []
    for start in range(0, len(asked), args.batch_size):
        batch = asked[start : start + args.batch_size]
        for (item, language, style, _), completion in zip(batch, engine.generate([p[3] for p in batch], options)):
            rows.append(
                {
                    "id": f"smollm2-{len(rows) + 1:03d}",
                    "language": language,
                    "style": style,
                    "item": item["source"],
                    "options": "".join(item["options"]),
                    "item_answer": item["answer"],
                    "finish": completion.finish_reason,
                    "reply": completion.text,
                }
            )
        print(f"{len(rows)} replies", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


if __name__ == "__main__":
    main()
