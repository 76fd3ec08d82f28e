"""Quantised export (quantize_model.py): bitsandbytes 4-bit NF4 / 8-bit, or GPTQ through gptqmodel, with the
perplexity and the memory of the model before and after.

bitsandbytes (`--method nf4 | int8`) quantises while transformers loads the weights; the saved folder records its
`quantization_config`, so `AutoModelForCausalLM.from_pretrained(folder)` reloads it quantised, as every script of
this project does. Recent bitsandbytes releases run these kernels on the CPU too (0.50.2 measured: NF4 and int8
load, forward, save and reload); where the installed one cannot, its probe (`check_bitsandbytes`) fails with a
one-line error before any model loads.

GPTQ (`--method gptq`) quantises layer by layer on a GPU against calibration text, through gptqmodel's public API
(`GPTQModel.load(path, QuantizeConfig(bits, group_size))`, `.quantize(calibration)`, `.save(folder)`); transformers
reloads its output where gptqmodel is installed. Without CUDA it stops with a one-line error naming the flag.

Perplexity: medicalgpt.eval.perplexity.run_perplexity, the windows of `evaluate.py --task perplexity` (per token).
Memory: `model.get_memory_footprint()` (weights and buffers, bytes), and the peak CUDA allocation where a GPU ran.
"""

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from medicalgpt.errors import UsageError

logger = logging.getLogger("medicalgpt")

BNB_METHODS = ("nf4", "int8")
METHODS = (*BNB_METHODS, "gptq")
CPU_BNB_SEEN = "0.50.2"  # a release seen quantising, saving and reloading on CPU


@dataclass
class QuantizeArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The model to quantise (hub name or folder; a LoRA adapter dir is merged)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the quantised model is written."})
    method: str = field(
        default="nf4",
        metadata={
            "help": "nf4 (4-bit, bitsandbytes), int8 (8-bit, bitsandbytes) or gptq (gptqmodel, GPU).",
            "choices": METHODS,
        },
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": 'Text to measure perplexity on, before and after (.txt lines or .jsonl "text"; a folder '
            "is searched), as evaluate.py --task perplexity. Without it only memory is compared."
        },
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Perplexity window in tokens (default: min(1024, model_max_length))."}
    )
    stride: int | None = field(default=None, metadata={"help": "Tokens a window advances by (default: block_size)."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the unquantised parts and of 4-bit compute: auto (bfloat16 on GPU, float32 on "
            "CPU), bfloat16, float16, float32."
        },
    )
    bits: int = field(default=4, metadata={"help": "gptq: bits per weight (2, 3, 4 or 8)."})
    group_size: int = field(default=128, metadata={"help": "gptq: weights per quantisation group (-1: per column)."})
    calibration_file: str | None = field(
        default=None, metadata={"help": "gptq: calibration text, as --eval_file (default: --eval_file)."}
    )
    num_calibration_samples: int = field(default=128, metadata={"help": "gptq: calibration samples."})
    calibration_max_length: int = field(default=512, metadata={"help": "gptq: tokens per calibration sample."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})
    unquantized_model_path: str | None = field(default=None, metadata={"help": "Upstream's --model_name_or_path."})
    quantized_model_output_path: str | None = field(default=None, metadata={"help": "Upstream's --output_dir."})

    def __post_init__(self):
        self.model_name_or_path = self.model_name_or_path or self.unquantized_model_path
        self.output_dir = self.output_dir or self.quantized_model_output_path
        if not self.model_name_or_path or not self.output_dir:
            raise ValueError("--model_name_or_path and --output_dir are required")
        if self.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--compute_dtype must be auto, bfloat16, float16 or float32, got {self.compute_dtype!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.batch_size < 1 or self.num_calibration_samples < 1 or self.calibration_max_length < 2:
            raise ValueError("--batch_size, --num_calibration_samples must be >= 1, --calibration_max_length >= 2")
        if self.method == "gptq" and not (self.calibration_file or self.eval_file):
            raise ValueError("--method gptq needs calibration text: --calibration_file (or --eval_file)")

    def torch_dtype(self):
        if self.compute_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.compute_dtype)


# -- backends ------------------------------------------------------------------------------------------------------


def check_backend(args):
    """The library and device the method needs, checked before any model loads; a one-line UsageError otherwise."""
    if args.method in BNB_METHODS:
        check_bitsandbytes(args.method)
    elif args.method == "gptq":
        if importlib.util.find_spec("gptqmodel") is None:
            raise UsageError("--method gptq needs gptqmodel on a CUDA machine: pip install gptqmodel (README).")
        if not cuda_available():
            raise UsageError(
                "--method gptq needs a CUDA GPU (gptqmodel quantises on it); on CPU use --method nf4 or --method int8"
            )


def cuda_available():
    return torch.cuda.is_available()


def check_bitsandbytes(method):
    """bitsandbytes installed, and able to quantise on this device: a GPU, or the CPU with a recent release. Probed
    with the two kernels the method uses on a small tensor, so an unsupported device fails here, in one line."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--method {method} needs bitsandbytes: pip install -r requirements-gpu.txt")
    import bitsandbytes.functional as bnb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if method == "nf4":
            bnb.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        else:
            bnb.int8_vectorwise_quant(torch.randn(4, 64, dtype=torch.float16, device=device))
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as error:
        version = importlib.metadata.version("bitsandbytes")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--method {method}: bitsandbytes {version} cannot quantise on {device} ({first_line}); run on a CUDA "
            f"GPU, or upgrade bitsandbytes (pip install -U bitsandbytes; {CPU_BNB_SEEN} runs on CPU)"
        ) from error


def bnb_config(method, compute_dtype):
    """The BitsAndBytesConfig written into the exported config.json: NF4 with double quantisation (QLoRA's, the
    smallest 4-bit format transformers reloads), or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantize_bnb(source, args, folder):
    """Load `source` quantised by bitsandbytes and save it into `folder` (weights and quantisation config)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=bnb_config(args.method, args.torch_dtype()),
        dtype=args.torch_dtype(),
        device_map="auto" if torch.cuda.is_available() else None,
        trust_remote_code=args.trust_remote_code,
    )
    model.save_pretrained(folder)


def calibration_samples(tokenizer, records, count, max_length):
    """gptq calibration: the text as one token stream (documents tokenised as pretraining.py does, EOS-ended), cut
    into `count` samples of `max_length` tokens (fewer when the text is short); {"input_ids", "attention_mask"}
    each, the form GPTQModel.quantize accepts."""
    from medicalgpt.eval.perplexity import tokenize_documents

    stream = [token for doc in tokenize_documents(tokenizer, [r["text"] for r in records], False) for token in doc]
    samples = [stream[i : i + max_length] for i in range(0, len(stream), max_length)][:count]
    samples = [ids for ids in samples if len(ids) > 1]
    if not samples:
        raise UsageError("--calibration_file: too little text to calibrate on")
    if len(samples) < count:
        logger.warning("Calibration: %d samples of up to %d tokens (asked for %d).", len(samples), max_length, count)
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]


def quantize_gptq(source, args, folder, calibration):
    """GPTQ through gptqmodel's public API: load, quantise against the calibration samples, save."""
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(source, QuantizeConfig(bits=args.bits, group_size=args.group_size))
    model.quantize(calibration, batch_size=1)
    model.save(folder)


# -- measures ------------------------------------------------------------------------------------------------------


def measure(model, tokenizer, records, args):
    """{"memory_bytes", "perplexity", "loss", "tokens"} of `model` (perplexity only with records)."""
    from medicalgpt.eval.perplexity import run_perplexity

    figures = {"memory_bytes": int(model.get_memory_footprint())}
    if records:
        block_size = args.block_size or min(1024, tokenizer.model_max_length)
        metrics, _ = run_perplexity(model.eval(), tokenizer, records, block_size, args.stride, args.batch_size, False)
        figures.update({key: metrics[key] for key in ("perplexity", "loss", "tokens", "block_size", "stride")})
    if torch.cuda.is_available():
        figures["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    return figures
