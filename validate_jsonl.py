"""Check training data before training: every problem is printed as `path:line: error|warning: field: what`,
then one summary line per file and a total. Exits 1 when any record is invalid (or a path is missing), else 0.

The checks are those the training scripts run (medicalgpt/data/validate.py): what passes here loads there.

    python validate_jsonl.py data/finetune --stage sft
    python validate_jsonl.py data/reward/dpo_zh_500.jsonl --stage preference
    python validate_jsonl.py data/kto --stage kto                        # KTO: one answer and a true/false label
    python validate_jsonl.py data/pretrain data/finetune data/reward    # each record's stage is inferred
    python validate_jsonl.py data --quiet                                # errors and the total only

With a tokenizer, the token lengths as training tokenises them (medicalgpt/processors/lengths.py): the distribution,
how many records `--model_max_length` (SFT) or `--max_source_length`/`--max_target_length` (preference) would
truncate, and how many supervised tokens that loses; `--plot` draws the histogram, `--show N` prints N records with
what the model learns marked [LEARN]...[/LEARN] (check that the end-of-turn token is inside: a model that never
learns it never stops).

    python validate_jsonl.py data/finetune --tokenizer Qwen/Qwen2.5-0.5B-Instruct --template_name qwen \\
        --model_max_length 512 --plot lengths.png --show 2
"""

import argparse
import sys

from medicalgpt.args import PreferenceArguments
from medicalgpt.data.validate import STAGES, find_data_files, validate_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="Data files, or folders searched recursively.")
    parser.add_argument(
        "--stage", choices=STAGES, default=None, help="The stage the data is for (default: inferred per record)."
    )
    parser.add_argument("--quiet", action="store_true", help="Print errors and the total only (no warnings).")
    tokens = parser.add_argument_group("token lengths (need --tokenizer)")
    tokens.add_argument("--tokenizer", metavar="PATH", help="Tokenizer (hub name, model or adapter folder).")
    tokens.add_argument("--template_name", help="Template from template.py (default: the tokenizer's own).")
    tokens.add_argument("--model_max_length", type=int, help="SFT: longest conversation in tokens.")
    tokens.add_argument(
        "--max_source_length",
        type=int,
        default=PreferenceArguments.max_source_length,
        help="Preference: prompt tokens kept (default %(default)s).",
    )
    tokens.add_argument(
        "--max_target_length",
        type=int,
        default=PreferenceArguments.max_target_length,
        help="Preference: response tokens kept (default %(default)s).",
    )
    tokens.add_argument("--system_prompt", help="System prompt for records without one (as in training).")
    tokens.add_argument("--plot", metavar="FILE.png", help="Draw the token-length histogram here.")
    tokens.add_argument("--show", type=int, default=0, metavar="N", help="Print N records with their label masks.")
    return parser


def summary(report) -> str:
    """`path: N records (kinds: sharegpt 950, ...), T turns, E errors, W warnings`"""
    kinds = ", ".join(f"{kind} {count}" for kind, count in report.kinds.most_common()) or "none"
    return (
        f"{report.path}: {len(report.records)} records (kinds: {kinds}), {report.turns} turns, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    )


def token_report(args, records) -> None:
    """Print length statistics (and --plot, --show) for the valid records."""
    import transformers

    from medicalgpt.args import ModelArguments
    from medicalgpt.model.loader import load_tokenizer
    from medicalgpt.processors.lengths import (
        check_end_of_turn,
        measure,
        plot_lengths,
        record_stage,
        render_masks,
        summarize,
    )
    from medicalgpt.templates import get_conv_template, template_from_tokenizer

    transformers.utils.logging.set_verbosity_error()  # not "sequence longer than model_max_length": we count those
    tokenizer = load_tokenizer(ModelArguments(tokenizer_name_or_path=args.tokenizer))
    by_stage = {stage: [r for r in records if record_stage(r) == stage] for stage in STAGES}
    chats = by_stage["sft"] or by_stage["preference"] or by_stage["kto"]
    template = None
    if chats:
        template = get_conv_template(args.template_name) if args.template_name else template_from_tokenizer(tokenizer)
        warning = check_end_of_turn(template, tokenizer)
        name = repr(args.template_name) if args.template_name else "the tokenizer's chat template"
        print(f"warning: {warning}" if warning else f"template {name}, end of turn {template.stop_str!r}")
    limits = {
        "pt": "",
        "sft": f"model_max_length {args.model_max_length}" if args.model_max_length else "",
        "preference": f"max_source_length {args.max_source_length} / max_target_length {args.max_target_length}",
        "kto": f"max_source_length {args.max_source_length} / max_target_length {args.max_target_length}",
    }
    reports = []
    for stage, stage_records in by_stage.items():
        if stage_records:
            report = measure(
                stage_records,
                stage,
                tokenizer,
                template=template,
                max_length=args.model_max_length,
                max_source=args.max_source_length,
                max_target=args.max_target_length,
                system=args.system_prompt,
            )
            reports.append(report)
            print("\n".join(summarize(reports[-1], limits[stage])))
    if args.plot and reports:
        plot_lengths(reports, args.plot, args.model_max_length)
        print(f"histogram written to {args.plot}")
    shown = (by_stage["sft"] + by_stage["preference"])[: args.show]
    if shown:
        print("\n".join(render_masks(shown, tokenizer, template, args.model_max_length, args.system_prompt)))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.tokenizer and (args.template_name or args.model_max_length or args.plot or args.show):
        parser.error("--template_name, --model_max_length, --plot and --show need --tokenizer")
    files, failed = [], False
    for path in args.paths:
        try:
            files += [file for file in find_data_files(path, args.stage) if file not in files]
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}")
            failed = True
    reports = []
    for path in files:
        reports.append(validate_file(path, args.stage))
        issues = reports[-1].errors + ([] if args.quiet else reports[-1].warnings)
        for issue in sorted(issues, key=lambda issue: issue.line):
            print(issue)
        if not args.quiet:
            print(summary(reports[-1]))
    records, turns = sum(len(r.records) for r in reports), sum(r.turns for r in reports)
    errors, warnings = sum(len(r.errors) for r in reports), sum(len(r.warnings) for r in reports)
    print(f"total: {len(files)} files, {records} records, {turns} turns, {errors} errors, {warnings} warnings")
    if args.tokenizer:
        try:
            token_report(args, [record for report in reports for record in report.records])
        except (ValueError, OSError) as error:  # no such tokenizer or template, no chat template
            print(f"error: {error}")
            failed = True
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
