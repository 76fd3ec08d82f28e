"""evaluate.py's outputs: results.json and the predictions, written whole, and the table printed."""

import json
import os


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
        rows = [("subject", "items", "acc", "acc_norm", "95% interval")]
        rows += [
            (name, s["items"], f"{s['accuracy']:.4f}", f"{s['acc_norm']:.4f}", "{:.3f}-{:.3f}".format(*s["ci95"]))
            for name, s in [*m["subjects"].items(), ("all", m)]
        ]
        rows += [("chance (guessing)", "", f"{m['chance']:.4f}", "", "")]
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
