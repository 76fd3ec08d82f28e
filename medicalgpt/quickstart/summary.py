"""What each stage of a run did, read back from its trainer_state.json: the figure that shows the stage working, its
first and last value, and whether it moved the way the stage intends (and why not, when it did not); then the model's
answers to the same questions before and after training, side by side.

    python -m medicalgpt.quickstart.summary outputs-pt-qwen-v1 outputs-sft-qwen-v1
    python -m medicalgpt.quickstart.summary --timings t.tsv --plots plots/ --json summary.json \\
        PT=outputs-pt SFT=outputs-sft \\
        --answers base=answers-base.jsonl SFT=answers-sft.jsonl DPO=answers-final.jsonl

`NAME=PATH` names a run (PT, SFT, RM, PPO, DPO, ORPO, KTO, SIMPO pick that stage's figure); `--timings` (a
`NAME<TAB>seconds` file, as run_pipeline.sh writes) adds wall time and stages without a trainer state (merges,
inference); `--plots DIR` writes one loss-curve PNG per training run; `--answers NAME=FILE` shows inference.py's
output files side by side.
"""

import argparse
import json
import os
import textwrap

DOWN, UP = -1, +1
# Stage -> the figures that show it working, best first: (log key, the direction the stage intends).
# A figure is used when the run logged it at least twice; eval figures (held-out data) come before training ones.
FIGURES = {
    "PT": [("eval_loss", DOWN), ("loss", DOWN)],
    "SFT": [("eval_loss", DOWN), ("loss", DOWN)],
    "RM": [("eval_margin", UP), ("margin", UP), ("loss", DOWN)],
    "PPO": [("eval_score", UP), ("score", UP)],
    "DPO": [("eval_rewards/margins", UP), ("rewards/margins", UP), ("loss", DOWN)],
    "ORPO": [("eval_rewards/margins", UP), ("rewards/margins", UP), ("loss", DOWN)],
    "KTO": [("eval_rewards/margins", UP), ("rewards/margins", UP), ("loss", DOWN)],
    "SIMPO": [("eval_rewards/margins", UP), ("rewards/margins", UP), ("loss", DOWN)],
}
DEFAULT_FIGURES = [("eval_loss", DOWN), ("loss", DOWN), ("score", UP)]
MEANING = {
    "eval_loss": "held-out loss",
    "loss": "training loss",
    "eval_margin": "held-out reward margin, chosen - rejected",
    "margin": "reward margin, chosen - rejected",
    "score": "reward-model score of sampled answers",
    "eval_score": "reward-model score of held-out answers",
    "rewards/margins": "implicit reward margin, chosen - rejected",
    "eval_rewards/margins": "held-out implicit reward margin",
}
WHY_NOT = {
    "PT": "a few steps on a small corpus; the loss curve shows whether it is still settling",
    "SFT": "too few steps (or too high a learning rate) for this model; see the loss curve",
    "RM": "a short run on a few pairs has not yet separated chosen from rejected answers",
    "PPO": "a short run against a weak reward model: the score is noisy and needs more episodes to rise",
    "DPO": "a short run; the margin starts at 0 (policy = reference) and needs more steps to grow",
    "ORPO": "a short run at ORPO's low learning rate; the odds-ratio margin needs more steps",
    "KTO": "a short run; the margin starts at 0 (policy = reference) and needs more steps to grow",
    "SIMPO": "a short run; SimPO's length-normalised margin needs more steps to pass its target",
}


def read_history(output_dir):
    """The run's log history, ending with its final evaluation (eval_results.json, written after the state)."""
    path = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    history = state["log_history"]
    final_eval = os.path.join(output_dir, "eval_results.json")
    if os.path.isfile(final_eval):
        with open(final_eval, encoding="utf-8") as f:
            metrics = json.load(f)
        if not any(entry.get("eval_loss") == metrics.get("eval_loss") for entry in history[-2:]):
            history = history + [{**metrics, "step": state.get("global_step", len(history))}]
    return history


def series(history, key):
    return [(entry.get("step", i), entry[key]) for i, entry in enumerate(history) if key in entry]


def figure(history, stage):
    """(key, direction, [(step, value)]) of the stage's best logged figure, or (None, None, [])."""
    for key, direction in FIGURES.get(stage, DEFAULT_FIGURES):
        points = series(history, key)
        if len(points) >= 2:
            return key, direction, points
    return None, None, []


def verdict(stage, direction, first, last):
    if first is None or last is None:
        return "-"
    if (last - first) * direction > 0:
        return "as intended"
    return f"not as intended: {WHY_NOT.get(stage, 'see the loss curve')}"


def summarize_run(output_dir, name=None, seconds=None):
    """{stage, seconds, figure, first, last, moved, output} of one run."""
    stage = name or os.path.basename(os.path.normpath(output_dir))
    history = read_history(output_dir) or []
    key, direction, points = figure(history, stage)
    runtime = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    first, last = (points[0][1], points[-1][1]) if points else (None, None)
    elapsed = seconds if seconds is not None else runtime
    return {
        "stage": stage,
        "seconds": None if elapsed is None else round(elapsed),
        "figure": f"{key} ({'down' if direction == DOWN else 'up'})" if key else None,
        "first": first,
        "last": last,
        "moved": verdict(stage, direction, first, last),
        "output": output_dir,
    }


def plot_run(output_dir, name, plot_dir):
    """A PNG of the run's training curve (and eval loss when logged); returns its path, or None."""
    history = read_history(output_dir)
    key, _, points = figure(history or [], name)
    train_key = key.removeprefix("eval_") if key else None
    train_points = series(history or [], train_key) if train_key else []
    if not train_points and not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 3.5))
    if train_points:
        axis.plot(*zip(*train_points), marker=".", label=train_key)
    if key != train_key:
        axis.plot(*zip(*points), marker="o", label=key)
    axis.set(title=f"{name}: {key}", xlabel="step")
    axis.legend()
    fig.tight_layout()
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, f"{name.lower()}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(rows):
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value):
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def read_timings(path):
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return {name: float(seconds) for name, seconds in rows}


def read_answers(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def question_of(record):
    """The last user turn of an inference.py input record."""
    turns = record.get("messages") or record.get("conversations")
    if turns:
        users = [t.get("content", t.get("value")) for t in turns if t.get("role", t.get("from")) in ("user", "human")]
        return users[-1]
    if "instruction" in record:
        return "\n".join(part for part in (record["instruction"], record.get("input")) if part)
    return record.get("prompt") or record.get("question") or ""


def format_answers(named_files, width=110, max_chars=420):
    """Each question, then each model's answer to it, labelled 'base model' / 'after SFT' / ..."""
    answers = {name: read_answers(path) for name, path in named_files}
    labels = {name: "base model" if name.lower() == "base" else f"after {name}" for name, _ in named_files}
    label_width = max(len(label) for label in labels.values())
    lines = []
    for index, record in enumerate(next(iter(answers.values()))):
        lines.append(f"Q{index + 1}. {question_of(record)}")
        for name, records in answers.items():
            text = " ".join(records[index]["output"].split()) if index < len(records) else "(missing)"
            text = text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ..."
            prefix = f"  {labels[name].ljust(label_width)} | "
            wrapped = textwrap.wrap(text or "(empty answer)", width - len(prefix)) or [""]
            lines += [prefix + wrapped[0]] + [" " * (len(prefix) - 2) + "| " + rest for rest in wrapped[1:]]
        lines.append("")
    return "\n".join(lines)


def split_named(items):
    return [item.split("=", 1) if "=" in item else (None, item) for item in items]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="Output directories, optionally named: NAME=PATH")
    parser.add_argument("--timings", help="NAME<TAB>seconds per stage")
    parser.add_argument("--plots", help="Folder for one loss-curve PNG per training run")
    parser.add_argument("--json", help="Also write the table as JSON here")
    parser.add_argument("--answers", nargs="+", default=[], help="inference.py output files to compare: NAME=FILE")
    args = parser.parse_args(argv)
    for name, path in split_named(args.answers):
        if name is None or not os.path.isfile(path):
            parser.error(f"--answers {name}={path}: expected NAME=FILE of an existing file")
    timings = read_timings(args.timings) if args.timings else {}
    named = split_named(args.runs)
    rows = [summarize_run(path, name, timings.get(name)) for name, path in named]
    if rows:
        print(format_table(rows))
    if timings:
        print(f"Total: {sum(timings.values()) / 60:.1f} minutes over {len(timings)} steps (--timings)")
    if args.plots:
        plots = [plot_run(path, name or os.path.basename(path), args.plots) for name, path in named]
        print(f"Loss curves: {', '.join(p for p in plots if p)}")
    if args.answers:
        print("\nAnswers (greedy) before and after training:\n")
        print(format_answers(split_named(args.answers)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
