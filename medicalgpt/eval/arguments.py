"""evaluate.py's command line: the model to load (EvalChatArguments, the chat engine's flags plus generation limits)
and what to evaluate it on (EvaluationArguments), with the settings each result records."""

from dataclasses import dataclass, field

from medicalgpt.eval.choice import TARGETS
from medicalgpt.eval.formats import FORMATS
from medicalgpt.serve.chat import ChatArguments

TASKS = ("choice", "qa", "perplexity")
CHOICE_SETTINGS = (  # what results.json records of a choice run, beside the metrics
    "data_file",
    "format",
    "split",
    "subjects",
    "n_shot",
    "prompt_format",
    "choice_mode",
    "choice_target",
)


@dataclass
class EvalChatArguments(ChatArguments):
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Model path or hub name (a merged model, or the base of --lora_model); not needed with "
            "--api_base, nor with --compare (then the base of its adapters)."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer (qa)."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of qa answers; 0 (default) = greedy, reproducible."}
    )


@dataclass
class EvaluationArguments:
    task: str = field(metadata={"help": "What to measure.", "choices": TASKS})
    data_file: str = field(
        metadata={"help": "Items to evaluate on (see above): a file, a benchmark's folder, or (choice) a hub name."}
    )
    output_dir: str = field(default="outputs-eval", metadata={"help": "Where results.json and predictions go."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward / generate call."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N items only."})
    skip_invalid_examples: bool = field(
        default=False, metadata={"help": "Skip and count invalid records instead of stopping at them."}
    )
    n_shot: int = field(default=0, metadata={"help": "choice: solved examples before each question."})
    prompt_format: str = field(
        default="chat",
        metadata={"help": "choice: chat (template) or plain (base models).", "choices": ("chat", "plain")},
    )
    format: str = field(
        default="auto",
        metadata={"help": "choice: the benchmark's file format (default: detected).", "choices": ("auto", *FORMATS)},
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "choice: the split of a benchmark folder scored (default: C-Eval val, "
            "CMMLU test, MMLU test); few-shot examples come from dev/."
        },
    )
    subjects: str | None = field(
        default=None, metadata={"help": "choice: 'medical' (the built-in list of C-Eval, CMMLU, MMLU) or a,b,c."}
    )
    choice_mode: str = field(
        default="loglikelihood",
        metadata={
            "help": "choice: loglikelihood (score each answer) or generate (parse the letter from a reply).",
            "choices": ("loglikelihood", "generate"),
        },
    )
    choice_target: str = field(
        default="letter",
        metadata={
            "help": "choice: score the option letters, or the options' texts (acc_norm differs).",
            "choices": TARGETS,
        },
    )
    compare: list[str] | None = field(
        default=None,
        metadata={
            "help": "choice: several models in one table, NAME=PATH each (PATH: a model folder, "
            "an adapter folder, a hub name, or with --api_base a served model)."
        },
    )
    api_base: str | None = field(
        default=None,
        metadata={"help": "choice, generate: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."},
    )
    api_key: str | None = field(default=None, metadata={"help": "The API key of --api_base (default: none)."})
    model: str | None = field(default=None, metadata={"help": "The model name --api_base serves it under."})
    block_size: int | None = field(
        default=None, metadata={"help": "perplexity: window in tokens (default: min(1024, model_max_length), as PT)."}
    )
    stride: int | None = field(
        default=None, metadata={"help": "perplexity: tokens a window advances by (default: block_size, no overlap)."}
    )

    def __post_init__(self):
        if self.batch_size < 1 or self.n_shot < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("--batch_size and --max_samples must be at least 1, --n_shot at least 0")
        if (self.block_size is not None and self.block_size < 2) or (self.stride is not None and self.stride < 1):
            raise ValueError("--block_size must be at least 2 and --stride at least 1")
        if self.api_base and self.choice_mode != "generate":
            raise ValueError("--api_base needs --choice_mode generate: an API returns text, not log-likelihoods")
        if self.stride and self.block_size and self.stride > self.block_size:
            raise ValueError("--stride must not exceed --block_size: tokens between windows would never be scored")
