"""Print what each training run did, from its trainer_state.json: loss before and after, time, where it is.

python -m medicalgpt.summary outputs/quickstart-pt outputs/quickstart-sft
"""

import json
import os
import sys


def summarize_run(output_dir):
    """{stage, seconds, first/last training loss, first/last eval loss, output} of one run's trainer_state.json."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    return {
        "run": os.path.basename(os.path.normpath(output_dir)),
        "seconds": runtime,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_eval_loss": eval_losses[0] if eval_losses else None,
        "last_eval_loss": eval_losses[-1] if eval_losses else None,
        "output": output_dir,
    }


def format_table(rows):
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value):
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def main(argv=None):
    runs = sys.argv[1:] if argv is None else argv
    print(format_table([summarize_run(run) for run in runs]))


if __name__ == "__main__":
    main()
