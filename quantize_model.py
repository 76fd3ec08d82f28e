"""Export a model quantised to 4 or 8 bits, with its perplexity and memory before and after, printed as JSON.

    python quantize_model.py --model_name_or_path merged-sft-qwen-v1 --method nf4 \\
        --eval_file data/eval/perplexity.txt --output_dir merged-sft-qwen-v1-nf4
    python quantize_model.py --model_name_or_path outputs-sft-qwen-v1 --method int8 --output_dir sft-int8
    python quantize_model.py --model_name_or_path merged-sft-qwen-v1 --method gptq --bits 4 --group_size 128 \\
        --calibration_file data/pretrain --eval_file data/eval/perplexity.txt --output_dir merged-sft-qwen-v1-gptq

`--method nf4` (4-bit NormalFloat with double quantisation) and `int8` use bitsandbytes (requirements-gpu.txt), on
a GPU or the CPU (bitsandbytes 0.50.2 measured). `gptq` uses gptqmodel on a CUDA GPU, calibrated on
`--num_calibration_samples` windows of `--calibration_max_length` tokens of text. A LoRA adapter directory is merged
into its base in full precision first. The folder written loads with plain transformers
(`AutoModelForCausalLM.from_pretrained(folder)`), and with inference.py, gradio_demo.py, fastapi_server_demo.py and
evaluate.py (`--base_model folder`). It is written under a temporary name and renamed when complete.

Printed (and saved as quantize_results.json in the folder): for the model before and after, the memory of its
weights (`memory_bytes`, and the peak CUDA allocation on a GPU) and, with `--eval_file`, the per-token perplexity
over the windows `evaluate.py --task perplexity` uses (`--block_size`, `--stride`). Upstream's
`--unquantized_model_path` / `--quantized_model_output_path` are accepted.
"""

import gc
import json
import logging
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM

from medicalgpt.args import ModelArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.data.files import find_data_files
from medicalgpt.data.validate import load_records
from medicalgpt.errors import UsageError
from medicalgpt.export.quantize import (
    QuantizeArguments,
    calibration_samples,
    check_backend,
    measure,
    quantize_bnb,
    quantize_gptq,
)
from medicalgpt.model.adapter import read_adapter_base
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_cli

logger = logging.getLogger("medicalgpt")


def read_text_records(path):
    return load_records(find_data_files(path, "pt"), "pt") if path else []


def write_folder(model, tokenizer, args, folder, calibration):
    """The quantised model and its tokenizer in `folder`. An adapter is merged and saved in full precision first, so
    the quantiser reads merged weights (merging into rounded weights would be approximate)."""
    source = args.model_name_or_path
    if read_adapter_base(source):
        source = os.path.join(folder, "merged-full-precision")
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.method == "gptq":
        quantize_gptq(source, args, folder, calibration)
    else:
        quantize_bnb(source, args, folder)
    tokenizer.save_pretrained(folder)
    if source != args.model_name_or_path:
        shutil.rmtree(source)


def main(argv=None):
    (args,) = parse_cli((QuantizeArguments,), argv, description=__doc__)
    setup_logging()
    output = os.path.normpath(args.output_dir)
    if os.path.isdir(output) and os.listdir(output) and not args.overwrite_output_dir:
        raise UsageError(f"{output} is not empty: choose a new --output_dir or pass --overwrite_output_dir")
    check_backend(args)
    records = read_text_records(args.eval_file)  # every record checked before the model loads
    calibration_records = read_text_records(args.calibration_file) if args.method == "gptq" else []

    model_args = ModelArguments(
        model_name_or_path=args.model_name_or_path,
        trust_remote_code=args.trust_remote_code,
        device_map="auto",
        torch_dtype=str(args.torch_dtype()).removeprefix("torch."),
    )
    tokenizer = load_tokenizer(model_args)
    calibration = None
    if args.method == "gptq":
        calibration = calibration_samples(
            tokenizer, calibration_records or records, args.num_calibration_samples, args.calibration_max_length
        )
    model = load_model(model_args)
    before = measure(model, tokenizer, records, args)
    logger.info("Before: %s", before)

    partial = output + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_folder(model, tokenizer, args, partial, calibration)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(partial, output)

    quantized = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=args.trust_remote_code)
    after = measure(quantized, tokenizer, records, args)
    config = getattr(quantized.config, "quantization_config", None)
    results = {
        "method": args.method,
        "model": args.model_name_or_path,
        "output_dir": output,
        "quantization_config": config.to_dict() if hasattr(config, "to_dict") else config,
        "before": before,
        "after": after,
        "memory_ratio": after["memory_bytes"] / before["memory_bytes"],
    }
    with open(os.path.join(output, "quantize_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2, default=str)
    print(json.dumps(results, ensure_ascii=False, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(run_cli(main))
