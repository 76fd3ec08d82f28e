"""Convert SFT data between formats, checking every record with the validator the training scripts use.

    python convert_dataset.py --input_file your_data.json --output_file converted_data.jsonl --template_name qwen
    python convert_dataset.py --input_file alpaca.jsonl --output_file chat.jsonl --output_format messages
    python convert_dataset.py --in_file qa.csv --out_file qa.jsonl --data_type qa --file_type csv   # upstream's form
    python convert_dataset.py --input_file data.json --output_file data.jsonl --data_type json2jsonl  # array -> lines

Input (`--data_type`, default auto: each record's format is recognised): alpaca (`instruction`, `input`, `output`,
`system`, `history`), sharegpt (`conversations`), OpenAI `messages`, or qa (question/answer keys, or CSV/TSV
columns: a header such as `question,answer` / `instruction,input,output`, or 2 or 3 unnamed columns). A `.json`
file may be one JSON array or JSON lines. Output (`--output_format`, default sharegpt): sharegpt, messages, alpaca
or `same` (the records as they are); a `.json` output file is one JSON array, anything else JSON lines. `system`,
alpaca `history`, `tools` and tool calls are kept. With `--template_name`, every record must also render with that
template. Any invalid record is reported as `path:line`, exit status 1, and nothing is written
(`--skip_invalid_examples` converts the rest); the output is checked again before it replaces `--output_file`.
"""

import argparse
import collections
import json
import os
import sys
import tempfile

from medicalgpt.data.convert import INPUT_TYPES, OUTPUT_FORMATS, WRITERS, check_input_type, table_records
from medicalgpt.data.files import read_table, read_units
from medicalgpt.data.validate import Issue, validate_file, validate_units


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", "--in_file", required=True, help="A .json, .jsonl, .csv or .tsv file.")
    parser.add_argument("--output_file", "--out_file", required=True, help="Where to write (.jsonl or .json).")
    parser.add_argument("--data_type", choices=INPUT_TYPES, default="auto", help="The input's format.")
    parser.add_argument(
        "--file_type", choices=("json", "jsonl", "csv", "tsv"), default=None, help="Default: from the extension."
    )
    parser.add_argument("--output_format", choices=OUTPUT_FORMATS, default=None, help="Default: sharegpt.")
    parser.add_argument("--template_name", default=None, help="Also check that every record renders with it.")
    parser.add_argument("--skip_invalid_examples", action="store_true", help="Convert the valid records only.")
    return parser


def read_input(path: str, file_type: str, data_type: str):
    """(line, record, problem) units of the input file, qa records mapped to alpaca."""
    if file_type in ("csv", "tsv"):
        yield from table_records(read_table(path, "\t" if file_type == "tsv" else None), data_type)
        return
    with open(path, "rb") as f:
        for line, value, problem in read_units(path, f, "json" if file_type in ("json", "jsonl") else file_type):
            yield (line, value, problem) if problem else (line, *check_input_type(value, data_type))


def convert(path: str, units, output_format: str, template):
    """Validate each (line, value, problem) unit and convert it: (records, errors, warnings, kinds)."""
    records, errors, warnings, kinds = [], [], [], collections.Counter()
    for unit in units:
        report = validate_units(path, [unit], "sft")
        errors.extend(report.errors)
        warnings.extend(report.warnings)
        kinds.update(report.kinds)
        for record in report.records:
            try:
                if template is not None:
                    template.render_turns(record["messages"], record.get("system"), record.get("tools"))
                records.append(unit[1] if output_format == "same" else WRITERS[output_format](record))
            except ValueError as error:
                errors.append(Issue(path, unit[0], "error", "", str(error)))
    return records, errors, warnings, kinds


def write_atomically(records: list[dict], path: str) -> None:
    """Write, validate the written file, then move it into place: `path` is never half-written or invalid."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if path.lower().endswith(".json") else "".join(f"{x}\n" for x in lines)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1] or ".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        check = validate_file(tmp, "sft")
        if check.errors or len(check.records) != len(records):
            problems = [str(error) for error in check.errors[:3]]
            raise RuntimeError(f"converted records that do not validate (a bug): {problems}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    file_type = args.file_type or os.path.splitext(args.input_file)[1].lower().lstrip(".")
    if file_type not in ("json", "jsonl", "csv", "tsv"):
        print(f"error: {args.input_file}: unknown file type {file_type!r}: pass --file_type json|jsonl|csv|tsv")
        return 1
    if not os.path.isfile(args.input_file):
        print(f"error: {args.input_file}: no such file")
        return 1
    if not args.output_file.lower().endswith((".json", ".jsonl")):
        print(f"error: {args.output_file}: the output must be a .jsonl (JSON lines) or .json (one array) file")
        return 1
    output_format = args.output_format or ("same" if args.data_type == "json2jsonl" else "sharegpt")
    template = None
    if args.template_name:
        from medicalgpt.templates import get_conv_template

        try:
            template = get_conv_template(args.template_name)
        except ValueError as error:
            print(f"error: {error}")
            return 1
    units = read_input(args.input_file, file_type, args.data_type)
    records, errors, warnings, kinds = convert(args.input_file, units, output_format, template)
    for issue in sorted(errors + warnings, key=lambda issue: issue.line):
        print(issue)
    if errors and not args.skip_invalid_examples:
        print(
            f"error: {len({e.line for e in errors})} invalid records in {args.input_file}; nothing written "
            "(fix them, or pass --skip_invalid_examples to convert the rest)"
        )
        return 1
    if not records:
        print(f"error: {args.input_file}: no records to convert; nothing written")
        return 1
    write_atomically(records, args.output_file)
    kinds = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    skipped = f", skipped {len({e.line for e in errors})} invalid" if errors else ""
    print(
        f"Converted {len(records)} records ({kinds}{skipped}) from {args.input_file} to {args.output_file} "
        f"({output_format}, {len(warnings)} warnings)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
