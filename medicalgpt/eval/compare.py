"""Several models on one benchmark, one table: `evaluate.py --task choice --compare NAME=PATH ...`.

    --compare base=Qwen/Qwen2.5-0.5B-Instruct sft=outputs-sft-qwen-v1 dpo=outputs-dpo-qwen-v1 merged=merged-sft-qwen-v1

A PATH holding adapter_config.json is a LoRA adapter: it is applied on --base_model when given, else on the base
its adapter_config.json names. With --api_base, each PATH is the name of a model the server serves. The table has a
row per subject, the overall accuracy and the accuracy of guessing; a column per model with its accuracy and 95%
Wilson interval. Written as compare.md and compare.json; each model's per-item predictions in <output_dir>/<NAME>/.

Also here: the client of an OpenAI-compatible chat API (vLLM, fastapi_server_demo.py) for `--choice_mode generate`.
"""

import dataclasses
import json
import os
import urllib.error
import urllib.request

from medicalgpt.errors import UsageError


def model_specs(specs, chat_args, api_base=None):
    """["name=path", ...] -> [(name, ChatArguments of that model)], every local path checked before any loads."""
    from medicalgpt.model.adapter import read_adapter_base

    models, names = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (os.path.basename(spec.rstrip("/")), spec)
        if not name or not path or name in names or "/" in name or name.startswith("."):
            raise UsageError(f"--compare {spec}: expected NAME=PATH with a distinct NAME (a folder name)")
        names.add(name)
        if api_base:
            models.append((name, dataclasses.replace(chat_args, base_model=path, lora_model=None)))
            continue
        local = path.startswith((".", "/", "~")) or path.count("/") != 1
        if local and not os.path.exists(path):
            raise UsageError(f"--compare {spec}: no such model folder {path}")
        adapter_base = read_adapter_base(path) if os.path.isdir(path) else None
        if adapter_base:
            base = chat_args.base_model or adapter_base
            models.append((name, dataclasses.replace(chat_args, base_model=base, lora_model=path)))
        else:
            models.append((name, dataclasses.replace(chat_args, base_model=path, lora_model=None)))
    return models


def compare_table(results):
    """{name: choice metrics} -> the Markdown table: a row per subject, overall, chance; a column per model."""
    names = list(results)
    subjects = sorted({subject for metrics in results.values() for subject in metrics["subjects"]})
    header = ["subject", "items", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(summary):
        low, high = summary["ci95"]
        return f"{summary['accuracy']:.3f} [{low:.3f}, {high:.3f}]"

    first = results[names[0]]
    for subject in subjects:
        summaries = [results[name]["subjects"].get(subject) for name in names]
        items = next(s["items"] for s in summaries if s)
        lines.append(f"| {subject} | {items} | " + " | ".join(cell(s) if s else "-" for s in summaries) + " |")
    lines.append(f"| **overall** | {first['items']} | " + " | ".join(cell(results[n]) for n in names) + " |")
    lines.append(f"| chance | {first['items']} | " + " | ".join(f"{results[n]['chance']:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n\nAccuracy [95% Wilson interval].\n"


def write_comparison(output_dir, results, settings):
    """compare.md and compare.json, each written whole under a temporary name, then renamed."""
    os.makedirs(output_dir, exist_ok=True)
    outputs = {
        "compare.md": compare_table(results),
        "compare.json": json.dumps({**settings, "models": results}, ensure_ascii=False, indent=2) + "\n",
    }
    for name, text in outputs.items():
        path = os.path.join(output_dir, name)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".partial", path)


# -- OpenAI-compatible API ---------------------------------------------------------------------------------------


def api_generator(api_base, api_key, model, max_tokens, temperature=0.0, timeout=600):
    """generate(conversations) -> reply texts, one POST /chat/completions per conversation."""
    url = api_base.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def ask(messages):
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        request = urllib.request.Request(url, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:300]
            raise UsageError(f"--api_base {api_base}: HTTP {error.code} from {url}: {detail}") from error
        except urllib.error.URLError as error:
            raise UsageError(f"--api_base {api_base}: cannot reach {url} ({error.reason})") from error
        return reply["choices"][0]["message"]["content"] or ""

    return lambda conversations: [ask(messages) for messages in conversations]
