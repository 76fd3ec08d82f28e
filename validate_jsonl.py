"""Check training data before training: every problem is printed as `path:line: error|warning: field: what`,
then one summary line per file and a total. Exits 1 when any record is invalid (or a path is missing), else 0.

The checks are those the training scripts run (medicalgpt/data.py): what passes here loads there.

    python validate_jsonl.py data/finetune --stage sft
    python validate_jsonl.py data/reward/dpo_zh_500.jsonl --stage preference
    python validate_jsonl.py data/pretrain data/finetune data/reward    # each record's stage is inferred
    python validate_jsonl.py data --quiet                                # errors and the total only
"""

import argparse
import sys

from medicalgpt.data import STAGES, find_data_files, validate_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="Data files, or folders searched recursively.")
    parser.add_argument(
        "--stage", choices=STAGES, default=None, help="The stage the data is for (default: inferred per record)."
    )
    parser.add_argument("--quiet", action="store_true", help="Print errors and the total only (no warnings).")
    return parser


def summary(report) -> str:
    """`path: N records (kinds: sharegpt 950, ...), T turns, E errors, W warnings`"""
    kinds = ", ".join(f"{kind} {count}" for kind, count in report.kinds.most_common()) or "none"
    return (
        f"{report.path}: {len(report.records)} records (kinds: {kinds}), {report.turns} turns, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
