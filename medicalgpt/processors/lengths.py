"""Token lengths of validated records as training will tokenise them: the distribution, what truncation would cut,
the supervised (learned) tokens lost, and records rendered with their label masks. Used by validate_jsonl.py.

SFT records go through `processors.sft.tokenize_conversation` (the exact SFT tokenisation and its default rule:
whole turns are dropped from the end to fit `model_max_length`, a first exchange that alone is too long is cut).
Preference records go through `processors.preference.tokenize_preference` (the prompt keeps its last
`max_source_length` tokens, each response its first `max_target_length`). Pretraining text is packed into blocks:
nothing is cut.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.processors.display import format_label_mask
from medicalgpt.processors.preference import tokenize_preference
from medicalgpt.processors.sft import tokenize_conversation

UNLIMITED = 1 << 60


@dataclass
class LengthReport:
    stage: str
    lengths: list[int] = field(default_factory=list)  # tokens per record, untruncated
    truncated: int = 0  # records that training would cut
    skipped: int = 0  # SFT records dropped whole: nothing of their first turn fits
    cut_answers: int = 0  # SFT records whose first exchange is cut to fit (--overlong truncate)
    dropped_turns: int = 0  # SFT turns dropped from the ends of conversations
    supervised: int = 0  # learned tokens before truncation
    lost: int = 0  # learned tokens truncation would remove


def record_stage(record: dict) -> str:
    """The stage of a normalised record."""
    if "label" in record:
        return "kto"
    return "pt" if "text" in record else "preference" if "chosen" in record else "sft"


def _learned(labels) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


def measure(records, stage, tokenizer, template=None, max_length=None, max_source=None, max_target=None, system=None):
    """A LengthReport over the normalised records of one stage."""
    report = LengthReport(stage)
    for record in records:
        if stage == "pt":
            report.lengths.append(len(tokenizer(record["text"])["input_ids"]) + 1)  # + EOS
        elif stage == "sft":
            _measure_conversation(report, record, template, tokenizer, max_length, system)
        else:  # preference, or kto: its answer (and a split pair's rejected answer) measured as a pair's
            if stage == "kto":
                record = {**record, "chosen": record["completion"], "rejected": record["rejected"] or ""}
            _measure_pair(
                report, record, template, tokenizer, max_source or UNLIMITED, max_target or UNLIMITED, system
            )
    return report


def _measure_conversation(report, record, template, tokenizer, max_length, system):
    full = tokenize_conversation(record, template, tokenizer, None, system_prompt=system)
    learned = _learned(full["labels"])
    report.lengths.append(len(full["input_ids"]))
    report.supervised += learned
    if max_length and len(full["input_ids"]) > max_length:
        cut = tokenize_conversation(record, template, tokenizer, max_length, system_prompt=system)
        report.truncated += 1
        report.skipped += not cut["input_ids"]
        report.cut_answers += cut["truncated"]
        report.dropped_turns += cut["dropped_turns"] if cut["input_ids"] else 0
        report.lost += learned - _learned(cut["labels"])


def _measure_pair(report, record, template, tokenizer, max_source, max_target, system):
    full = tokenize_preference(record, template, tokenizer, UNLIMITED, UNLIMITED, system)
    responses = (len(full["chosen_ids"]), len(full["rejected_ids"]))
    report.lengths.append(len(full["prompt_ids"]) + max(responses))
    report.supervised += sum(responses)
    report.lost += sum(max(0, n - max_target) for n in responses)
    report.truncated += len(full["prompt_ids"]) > max_source or max(responses) > max_target


def summarize(report: LengthReport, limits: str) -> list[str]:
    """Printable lines: the distribution, then what `limits` (e.g. "model_max_length 512") would cut."""
    lengths = sorted(report.lengths)
    if not lengths:
        return [f"{report.stage}: no records to measure"]
    n = len(lengths)
    quantile = {q: lengths[min(n - 1, int(q * n))] for q in (0.5, 0.9, 0.99)}
    lines = [
        f"{report.stage} token lengths over {n} records: min {lengths[0]}, median {quantile[0.5]}, "
        f"p90 {quantile[0.9]}, p99 {quantile[0.99]}, max {lengths[-1]}, mean {statistics.fmean(lengths):.1f}"
    ]
    if report.stage == "pt":
        return [*lines, "pt: documents are packed into --block_size blocks: nothing is truncated"]
    if not limits:
        return lines
    share = 100 * report.lost / report.supervised if report.supervised else 0.0
    detail = (
        f" ({report.dropped_turns} turns dropped from their ends, {report.cut_answers} first exchanges cut, "
        f"{report.skipped} records skipped whole)"
        if report.stage == "sft"
        else ""
    )
    lines.append(
        f"{report.stage} at {limits}: {report.truncated} of {n} records would be truncated{detail}; "
        f"{report.lost} of {report.supervised} supervised tokens lost ({share:.2f}%)"
    )
    return lines


def check_end_of_turn(template, tokenizer) -> str | None:
    """A warning when the template's end of turn is not one token for this tokenizer: the model would learn it as
    several text tokens, never emit the stop token, and never stop."""
    stop = template.stop_str.strip() or template.stop_str
    ids = tokenizer.encode(stop, add_special_tokens=False)
    if len(ids) == 1:
        return None
    return (
        f"template {template.name!r} ends assistant turns with {stop!r}, which this tokenizer splits into "
        f"{len(ids)} tokens: the model would never learn to emit a stop token. Use the template of this model."
    )


def render_masks(records, tokenizer, template, max_length=None, system=None) -> list[str]:
    """Each SFT or preference record as the model sees it, learned spans in [LEARN]...[/LEARN] (SFT truncation
    applied; preference pairs in full)."""
    shown = []
    for record in records:
        stage = record_stage(record)
        shown.append(f"--- {record['source']} ({stage})")
        if stage == "sft":
            ids = tokenize_conversation(record, template, tokenizer, max_length, system_prompt=system)
            shown.append(
                format_label_mask(ids["input_ids"], ids["labels"], tokenizer)
                if ids["input_ids"]
                else f"(skipped: the first turn alone is longer than model_max_length {max_length})"
            )
        else:
            ids = tokenize_preference(record, template, tokenizer, UNLIMITED, UNLIMITED, system)
            for key in ("chosen_ids", "rejected_ids"):
                tokens, labels = ids["prompt_ids"] + ids[key], [IGNORE_INDEX] * len(ids["prompt_ids"]) + ids[key]
                shown.append(f"[{key[:-4]}] " + format_label_mask(tokens, labels, tokenizer))
    return shown


def plot_lengths(reports: list[LengthReport], path: str, max_length: int | None = None) -> None:
    """A histogram of token lengths per stage, the max length marked; written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for report in reports:
        ax.hist(report.lengths, bins=50, alpha=0.6, label=f"{report.stage} ({len(report.lengths)} records)")
    if max_length:
        ax.axvline(max_length, color="red", linestyle="--", label=f"model_max_length {max_length}")
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    ax.set_title("Token lengths")
    ax.legend()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
