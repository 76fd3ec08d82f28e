"""What each run did, from its trainer_state.json: time, first and last loss (or PPO reward), where it is.

    python -m medicalgpt.summary outputs-pt-qwen-v1 outputs-sft-qwen-v1
    python -m medicalgpt.summary --timings t.tsv --plots plots/ --json summary.json PT=outputs-pt SFT=outputs-sft

`NAME=PATH` names a run; `--timings` (a `NAME<TAB>seconds` file, as run_pipeline.sh writes) adds wall time and
stages without a trainer state (merges, inference); `--plots DIR` writes one loss-curve PNG per training run.
"""

import argparse
import json
import os

CURVE_KEYS = ("loss", "score")  # training loss, or PPO's mean reward-model score


def read_history(output_dir):
    path = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["log_history"]


def curve(history):
    """(metric name, [(step, value)]) of the run's training curve."""
    for key in CURVE_KEYS:
        points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(history) if key in entry]
        if points:
            return key, points
    return None, []


def summarize_run(output_dir, name=None, seconds=None):
    """{stage, seconds, metric, first, last, first/last eval loss, output} of one run."""
    history = read_history(output_dir) or []
    metric, points = curve(history)
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    return {
        "stage": name or os.path.basename(os.path.normpath(output_dir)),
        "seconds": seconds if seconds is not None else runtime,
        "metric": metric,
        "first": points[0][1] if points else None,
        "last": points[-1][1] if points else None,
        "first_eval_loss": eval_losses[0] if eval_losses else None,
        "last_eval_loss": eval_losses[-1] if eval_losses else None,
        "output": output_dir,
    }


def plot_run(output_dir, name, plot_dir):
    """A PNG of the run's training curve (and eval loss when logged); returns its path, or None."""
    history = read_history(output_dir)
    metric, points = curve(history or [])
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(*zip(*points), marker=".", label=metric)
    evals = [(entry.get("step", 0), entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    if evals:
        axis.plot(*zip(*evals), marker="o", label="eval_loss")
    axis.set(title=f"{name}: {metric}", xlabel="step")
    axis.legend()
    figure.tight_layout()
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, f"{name.lower()}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def format_table(rows):
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value):
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def read_timings(path):
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return {name: float(seconds) for name, seconds in rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="Output directories, optionally named: NAME=PATH")
    parser.add_argument("--timings", help="NAME<TAB>seconds per stage")
    parser.add_argument("--plots", help="Folder for one loss-curve PNG per training run")
    parser.add_argument("--json", help="Also write the table as JSON here")
    args = parser.parse_args(argv)
    timings = read_timings(args.timings) if args.timings else {}
    named = [run.split("=", 1) if "=" in run else (None, run) for run in args.runs]
    rows = [summarize_run(path, name, timings.get(name)) for name, path in named]
    print(format_table(rows))
    if args.plots:
        plots = [plot_run(path, name or os.path.basename(path), args.plots) for name, path in named]
        print(f"Loss curves: {', '.join(p for p in plots if p)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
