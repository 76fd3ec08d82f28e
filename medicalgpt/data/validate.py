"""Validate training data files and report every problem: the one validator that `validate_jsonl.py` and every
training script use. What one record may look like, and its normalised shape per stage, is medicalgpt.data.shapes.

Problems are reported compiler-style (`path:line: error: field: what is wrong`), all of them, never stopping at the
first; a bad record is never dropped silently. Normalised records carry "source": "path:line".

Records can be kept (`validate_file`, `load_records`: small files, tools) or streamed (`iter_file_records`,
`iter_row_records`): a generator yields each valid record as it is read while its FileReport collects the issues and
counts, so a corpus of millions of records is validated in flat memory; `check_reports` then raises or logs.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from medicalgpt.data.files import find_data_files, read_units
from medicalgpt.data.shapes import (  # noqa: F401  (re-exported: the names users and tools import from here)
    MESSAGE_ROLES,
    SHAREGPT_ROLES,
    STAGES,
    Checker,
    check_stage,
    detect_stage,
    validate_record,
)
from medicalgpt.data.unpaired import validate_labelled
from medicalgpt.errors import MAX_SHOWN, DataValidationError

logger = logging.getLogger(__name__)


@dataclass
class Issue:
    """One problem; line 0 means the whole file."""

    path: str
    line: int
    severity: str  # "error" | "warning"
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {self.severity}: {what}"


@dataclass
class FileReport:
    path: str
    records: list[dict] = field(default_factory=list)  # normalised valid records, in file order
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    kinds: collections.Counter = field(default_factory=collections.Counter)  # valid records per detected format
    turns: int = 0  # messages in valid records (for preference: context messages + the response)
    valid: int = 0  # valid records (also when they are streamed, not kept in `records`)


def iter_units_records(report: FileReport, units, stage: str | None):
    """Yield the normalised valid record of each (line, value, problem) unit; issues and counts go to `report`."""
    seen = 0
    for line, value, problem in units:
        seen, ck = seen + 1, Checker()
        if problem:
            ck.error("", problem)
            record = None
        else:
            record, kind = validate_labelled(value, stage, ck)
        for severity, where, message in ck.items:
            issues = report.errors if severity == "error" else report.warnings
            issues.append(Issue(report.path, line, severity, where, message))
        if record is not None and not ck.errors:
            record["source"] = f"{report.path}:{line}"
            report.valid += 1
            report.kinds[kind] += 1
            report.turns += len(record.get("messages", ())) + ("chosen" in record)
            yield record
    if not seen:
        report.warnings.append(Issue(report.path, 0, "warning", "", "no records in this file"))


def iter_file_records(report: FileReport, stage: str | None = None):
    """Yield the normalised valid records of the file `report.path` as it is read (stage None infers each record's
    stage; a .txt file is pt); issues and counts go to `report`."""
    check_stage(stage, optional=True)
    path = report.path
    if path.lower().endswith(".txt"):
        if stage not in (None, "pt"):
            report.errors.append(Issue(path, 0, "error", "", f"a .txt file holds pt text, not {stage} data"))
            return
        stage = "pt"
    try:
        with open(path, "rb") as f:
            yield from iter_units_records(report, read_units(path, f), stage)
    except OSError as e:
        report.errors.append(Issue(path, 0, "error", "", f"cannot read the file: {e.strerror or e}"))


def iter_row_records(report: FileReport, rows, stage: str):
    """Yield the normalised valid records of in-memory rows (e.g. a hub dataset split), reported as
    `report.path:row`, counted from 1. Keys whose value is None are ignored: `datasets` fills them in for columns a
    row does not have."""
    check_stage(stage)
    units = (
        (i, {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row, None)
        for i, row in enumerate(rows, 1)
    )
    yield from iter_units_records(report, units, stage)


def validate_units(path: str, units, stage: str | None = None) -> FileReport:
    """Validate and normalise (line, value, problem) units read from `path` (see medicalgpt.data.files), e.g. table
    rows mapped to records; stage None infers each record's stage."""
    check_stage(stage, optional=True)
    report = FileReport(path)
    report.records = list(iter_units_records(report, units, stage))
    return report


def validate_file(path: str, stage: str | None = None) -> FileReport:
    """Validate and normalise one file, its records kept in the report; stage None infers each record's stage."""
    report = FileReport(path)
    report.records = list(iter_file_records(report, stage))
    return report


def normalize_rows(rows, stage: str, name: str, skip_invalid: bool = False) -> list[dict]:
    """Validate and normalise in-memory rows into a list (see `iter_row_records`); errors as `check_reports`."""
    report = FileReport(name)
    records = list(iter_row_records(report, rows, stage))
    check_reports([report], skip_invalid)
    return records


def _log_issues(title: str, issues: list[Issue], shown: int = MAX_SHOWN) -> None:
    lines = [str(issue) for issue in issues[:shown]]
    if len(issues) > shown:
        lines.append(f"... and {len(issues) - shown} more")
    logger.warning("%s:\n%s", title, "\n".join(lines))


def check_reports(reports: list[FileReport], skip_invalid: bool) -> int:
    """Log the warnings; raise DataValidationError listing every error unless skip_invalid, which logs the skipped
    records per file instead. Returns the number of records skipped."""
    warnings = [issue for report in reports for issue in report.warnings]
    if warnings:
        _log_issues(f"{len(warnings)} data warnings", warnings)
    errors = [issue for report in reports for issue in report.errors]
    if errors and not skip_invalid:
        raise DataValidationError(errors)
    skipped = 0
    for report in (report for report in reports if report.errors):
        in_file = len({issue.line for issue in report.errors})
        skipped += in_file
        _log_issues(f"{report.path}: skipped {in_file} invalid records (--skip_invalid_examples)", report.errors, 5)
    return skipped


def check_usable(reports: list[FileReport]) -> None:
    """Raise DataValidationError when no file had a valid record."""
    if not any(report.valid for report in reports):
        raise DataValidationError([Issue(report.path, 0, "error", "", "no usable records") for report in reports])


def load_records(paths: list[str], stage: str, skip_invalid: bool = False) -> list[dict]:
    """Validate every file (directories are searched) and return the normalised records of all, in order, as a list
    (for small data; training streams them to disk: medicalgpt.train.records). Any error raises DataValidationError
    listing them all, unless skip_invalid: then bad records are skipped, counted and logged. Warnings are logged."""
    check_stage(stage)
    reports = [validate_file(path, stage) for path in find_data_files(paths, stage)]
    check_reports(reports, skip_invalid)
    check_usable(reports)
    return [record for report in reports for record in report.records]
