"""Parity with lm-evaluation-harness: the same benchmark files, model and prompts scored by evaluate.py and by lm-eval.

    python -m bench.lm_eval_parity                         # models/smollm2-135m-instruct (make real-model), else tiny
    python -m bench.lm_eval_parity --model merged-sft-qwen-v1 --n_shot 2

lm-eval runs in its own environment, bench/.venv-lmeval (git-ignored), made here when missing: `torch==2.13.0`
first, then `lm-eval[hf]==0.4.13` with the project's transformers 5.23.0. Its tasks are local YAMLs over the
project's sample files themselves:
  * one task per subject over data/eval/ceval, cmmlu and mmlu (`dataset_path: csv` on the per-subject CSVs,
    C-Eval's val and CMMLU's and MMLU's test scored, few-shot from dev/ with lm-eval's first_n sampler), the option
    letters as choices;
  * MedQA over data/eval/medqa/dev.jsonl (`dataset_path: json`), the options' texts as choices (cloze, where
    acc_norm and acc can differ), zero-shot.
The YAMLs reproduce evaluate.py's plain prompt (`--prompt_format plain`): the instruction line as lm-eval's
`description`, the question and its options, the cue `答案：` (no space before the letter) or `Answer:` (a space).
lm-eval's own C-Eval task differs from ours in its prompt ("以下是中国关于{科目}考试的单项选择题，请选出
其中的正确答案。" and a space after "答案："). The script checks that each prompt lm-eval built equals ours, then
prints for each task both tools' acc and acc_norm, the items whose predictions agree (acc and acc_norm), and the
largest difference between the two tools' log-likelihoods. JSON on stdout.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from bench.common import REPO, load_average, model_path

VENV = os.path.join(REPO, "bench", ".venv-lmeval")
LM_EVAL = ("lm-eval[hf]==0.4.13", "transformers==5.23.0")  # the project's transformers: the same tokenisation
EVAL = os.path.join(REPO, "data", "eval")
MEDQA = os.path.join(EVAL, "medqa", "dev.jsonl")
CSV_BENCHMARKS = {  # format: (folder, split scored, (question column, answer column), how datasets reads the CSV)
    "ceval": (os.path.join(EVAL, "ceval"), "val", ("question", "answer"), "usecols: [question, A, B, C, D, answer]"),
    "cmmlu": (os.path.join(EVAL, "cmmlu"), "test", ("Question", "Answer"), "usecols: [Question, A, B, C, D, Answer]"),
    "mmlu": (os.path.join(EVAL, "mmlu"), "test", ("question", "answer"),
             "column_names: [question, A, B, C, D, answer]"),
}  # fmt: skip
SUBJECTS = {"ceval": ("clinical_medicine", "basic_medicine"), "cmmlu": ("anatomy", "nutrition"),
            "mmlu": ("anatomy", "medical_genetics")}  # fmt: skip
REAL_MODEL = os.path.join(REPO, "models", "smollm2-135m-instruct")


def ensure_venv():
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(os.path.join(VENV, "bin", "lm_eval")):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", *LM_EVAL], check=True)
    return os.path.join(VENV, "bin", "lm_eval")


def yaml_string(text):
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML string


def subject_task(fmt, subject, items, n_shot):
    """A task over one subject's released CSVs: the scored split and dev/ for first_n few-shot."""
    from medicalgpt.eval.items import answer_cue, choice_instruction

    folder, split, (question, answer), reading = CSV_BENCHMARKS[fmt]
    suffix = "" if fmt == "cmmlu" else "_{}"
    data = {"validation": os.path.join(folder, split, f"{subject}{suffix.format(split)}.csv"),
            "dev": os.path.join(folder, "dev", f"{subject}{suffix.format('dev')}.csv")}  # fmt: skip
    cue, space = answer_cue(items[0])
    text = f"{{{{{question}}}}}\nA. {{{{A}}}}\nB. {{{{B}}}}\nC. {{{{C}}}}\nD. {{{{D}}}}\n{cue}"
    return f"""task: parity_{fmt}_{subject}
dataset_path: csv
dataset_kwargs:
  data_files: {json.dumps(data)}
  {reading}
  keep_default_na: false
output_type: multiple_choice
validation_split: validation
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: {n_shot}
description: {yaml_string(choice_instruction(items[0]) + chr(10) * 2)}
doc_to_text: {yaml_string(text)}
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index({answer})}}}}"
target_delimiter: {yaml_string(space)}
fewshot_delimiter: {yaml_string(chr(10) * 2)}
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def medqa_task():
    letters = "ABCDE"
    options = "\n".join(f"{letter}. {{{{options.{letter}}}}}" for letter in letters)
    choices = ", ".join(f"options.{letter}" for letter in letters)
    instruction = "The following is a multiple choice question about {{meta_info}}. "
    instruction += "Answer with the letter of the correct option.\n\n"
    return f"""task: parity_medqa
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps({"validation": MEDQA})}
output_type: multiple_choice
validation_split: validation
num_fewshot: 0
description: {yaml_string(instruction)}
doc_to_text: {yaml_string("{{question}}" + chr(10) + options + chr(10) + "Answer:")}
doc_to_choice: "{{{{[{choices}]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D', 'E'].index(answer_idx)}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def our_side(model, tokenizer, n_shot):
    """{task: (items, rows, prompts, shots used)} scored by evaluate.py's code, plain prompts."""
    from medicalgpt.eval.benchmarks import load_benchmark
    from medicalgpt.eval.choice import run_choice
    from medicalgpt.eval.items import choice_text, pick_shots

    tasks = {}
    for fmt, subjects in SUBJECTS.items():
        for subject in subjects:
            items, shots = load_benchmark(CSV_BENCHMARKS[fmt][0], fmt, subjects=subject)
            n = min(n_shot, len(shots))  # lm-eval's first_n needs that many dev items of the subject
            _, rows = run_choice(model, tokenizer, items, None, n, 8, False, shots)
            prompts = [choice_text(item, pick_shots(items, i, n, shots)) for i, item in enumerate(items)]
            tasks[f"parity_{fmt}_{subject}"] = (items, rows, prompts, n)
    items, _ = load_benchmark(MEDQA, "medqa")
    _, rows = run_choice(model, tokenizer, items, None, 0, 8, False, None, "option")
    tasks["parity_medqa"] = (items, rows, [choice_text(item, [], "option") for item in items], 0)
    return tasks


def run_lm_eval(lm_eval, model, tasks_dir, out_dir, names):
    command = [lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--tasks",
               ",".join(names), "--include_path", tasks_dir, "--device", "cpu", "--batch_size", "4",
               "--log_samples", "--output_path", out_dir]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, stdout=sys.stderr)
    results = json.load(open(sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True))[-1]))
    samples = {}
    for name in names:
        path = sorted(glob.glob(os.path.join(out_dir, "**", f"samples_{name}_*.jsonl"), recursive=True))[-1]
        samples[name] = sorted((json.loads(line) for line in open(path)), key=lambda s: int(s["doc_id"]))
    return results["results"], samples


def compare(name, ours, theirs, samples):
    items, rows, prompts, shots = ours
    candidates = [list(row["scores"]) for row in rows]
    lm_lls = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]  # logged as strings
    lm_pred = [candidates[i][max(range(len(lls)), key=lls.__getitem__)] for i, lls in enumerate(lm_lls)]
    contexts = [sample["arguments"]["gen_args_0"]["arg_0"] for sample in samples]
    difference = max(abs(ours_ll - theirs_ll) for row, lls in zip(rows, lm_lls)
                     for ours_ll, theirs_ll in zip(row["scores"].values(), lls))  # fmt: skip
    return {
        "task": name,
        "items": len(items),
        "n_shot": shots,
        "ours": {"acc": mean(row["correct"] for row in rows), "acc_norm": mean(row["correct_norm"] for row in rows)},
        "lm_eval": {"acc": theirs[name]["acc,none"], "acc_norm": theirs[name]["acc_norm,none"]},
        "same_prediction": sum(row["prediction"] == pred for row, pred in zip(rows, lm_pred)),
        "same_acc_norm_item": sum(row["correct_norm"] == (float(s["acc_norm"]) == 1) for row, s in zip(rows, samples)),
        "same_prompt": sum(ours_p == theirs_p for ours_p, theirs_p in zip(prompts, contexts)),
        "max_loglikelihood_difference": round(difference, 5),
    }


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A local model folder (default: models/smollm2-135m-instruct, else tiny).")
    parser.add_argument("--n_shot", type=int, default=2, help="Few-shot examples from dev/ (at most a subject's).")
    parser.add_argument("--work_dir", help="Keep lm-eval's task YAMLs and outputs here (default: a temporary folder).")
    args = parser.parse_args()
    model_dir = args.model or (REAL_MODEL if os.path.isfile(os.path.join(REAL_MODEL, "config.json")) else None)
    model_dir = os.path.abspath(model_path(model_dir))
    lm_eval = ensure_venv()

    from medicalgpt.eval.perplexity import load_scoring_model
    from medicalgpt.serve.chat import ChatArguments

    model, tokenizer = load_scoring_model(ChatArguments(base_model=model_dir))
    ours = our_side(model, tokenizer, args.n_shot)
    with tempfile.TemporaryDirectory(prefix="lm-eval-parity-") as temporary:
        work = args.work_dir or temporary
        tasks_dir = os.path.join(work, "tasks")
        os.makedirs(tasks_dir, exist_ok=True)
        for name, (items, _, _, n) in ours.items():
            if name != "parity_medqa":
                fmt, subject = name.removeprefix("parity_").split("_", 1)
                with open(os.path.join(tasks_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
                    f.write(subject_task(fmt, subject, items, n))
        with open(os.path.join(tasks_dir, "medqa.yaml"), "w", encoding="utf-8") as f:
            f.write(medqa_task())
        theirs, samples = run_lm_eval(lm_eval, model_dir, tasks_dir, os.path.join(work, "out"), list(ours))
    tasks = [compare(name, ours[name], theirs, samples[name]) for name in ours]
    totals = {key: sum(task[key] for task in tasks) for key in ("items", "same_prediction", "same_prompt")}
    report = {"model": model_dir, "n_shot": args.n_shot, "load_average": load_average(), "all": totals, "tasks": tasks}
    print(json.dumps(report, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
