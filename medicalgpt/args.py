"""Arguments shared by every stage, declared once.

Stage-specific training options come from the trainer's own config class (TrainingArguments, trl's SFTConfig,
DPOConfig, ...), parsed directly by `medicalgpt.parser`, so every option those libraries have is settable from the
command line. A field declared here that the config class also has (e.g. trl's `trust_remote_code`) is parsed once
and shared.
"""

from dataclasses import dataclass, field

TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub name or local path of the model; a LoRA adapter directory is accepted too."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use when it differs from the model's (default: the model's)."}
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype: auto, bfloat16, float16 or float32 (default: what the checkpoint says)."},
    )
    flash_attn: bool = field(
        default=False,
        metadata={"help": "FlashAttention-2 (needs CUDA and flash-attn; otherwise a warning and sdpa)."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa or flash_attention_2 (overrides --flash_attn)."}
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "Device placement, e.g. auto; ignored on CPU and under data parallel (a GPU per rank)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load weights in 4-bit NF4 (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load weights in 8-bit (bitsandbytes)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run model code shipped with the checkpoint (off: only library code)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})

    def __post_init__(self):
        if self.torch_dtype is not None and self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {self.torch_dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: pick one.")


@dataclass
class DataArguments:
    train_file_dir: str | None = field(
        default=None, metadata={"help": "Folder (searched recursively) or file with training data: .txt .json .jsonl"}
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Folder or file with evaluation data (same formats as training)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hugging Face hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    validation_split_percentage: int = field(
        default=1,
        metadata={"help": "Percent of the training data held out for evaluation when no validation data is given."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training records (for quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation records."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenise the data."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenise instead of using the datasets cache."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "PT and SFT: read, tokenise and pack the data as training consumes it (a corpus too large to "
            "write once more; a hub dataset). Needs --max_steps. See medicalgpt/train/streaming.py."
        },
    )
    skip_invalid_examples: bool = field(
        default=False,
        metadata={"help": "Skip records that fail validation (they are counted and reported) instead of stopping."},
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Conversation template (see template.py); default: the tokenizer's own chat template."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for records without one (default: the template's)."}
    )

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be between 0 and 99.")


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    target_modules: str = field(
        default="all",
        metadata={"help": "Comma-separated module names, or 'all': every linear layer but the output head."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (effective scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head"
        },
    )
    peft_path: str | None = field(default=None, metadata={"help": "An existing LoRA adapter to continue training."})
    qlora: bool = field(default=False, metadata={"help": "Upstream's QLoRA switch: same as --load_in_4bit True."})
    pure_bf16: bool = field(
        default=False,
        metadata={
            "help": "Keep the trainable weights in bf16 (half the memory of weights, gradients and optimizer states; "
            "updates below bf16's resolution are lost). Default: float32 whatever the checkpoint's dtype."
        },
    )
    save_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the final weights: auto (a full model in the checkpoint's dtype, a LoRA adapter in "
            "float32), float32, bfloat16 or float16. See medicalgpt/precision.py."
        },
    )

    def __post_init__(self):
        if self.save_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--save_dtype must be auto, float32, bfloat16 or float16, got {self.save_dtype!r}")


@dataclass
class LegacyArguments:
    """Flags of the tutorial that transformers 5 dropped, kept with their meaning."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from scratch instead of resuming from the last checkpoint in --output_dir."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch records of similar length (= --train_sampling_strategy group_by_length)."},
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warmup as a fraction of the training steps (= --warmup_steps below 1)."}
    )
    no_cuda: bool = field(default=False, metadata={"help": "Train on CPU (= --use_cpu)."})
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard log folder (default output_dir/runs)."}
    )


@dataclass
class PretrainingArguments:
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training block (default: min(1024, the tokenizer's model_max_length))."},
    )


@dataclass
class SupervisedArguments:
    model_max_length: int | None = field(
        default=None,
        metadata={"help": "Longest tokenised conversation; later turns that do not fit are dropped (see README)."},
    )
    overlong: str = field(
        default="truncate",
        metadata={
            "help": "A first exchange longer than --model_max_length: truncate (keep the prompt's head and the "
            "answer's start; a cut answer learns no end-of-turn token) or drop (skip the conversation)."
        },
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Learn every token, prompts included, not only the assistant turns."}
    )
    chunked_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Compute the loss from chunks of the learned tokens, never the whole [tokens x vocab] logits "
            "(medicalgpt/train/chunked_loss.py). Default: on when training on CPU; on GPU trl's fused LM head does "
            "the same."
        },
    )

    def __post_init__(self):
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"--overlong must be truncate or drop, got {self.overlong!r}")


@dataclass
class PreferenceArguments:
    max_source_length: int = field(
        default=1024, metadata={"help": "Prompt tokens kept (the last ones: the question nearest the answer)."}
    )
    max_target_length: int = field(
        default=512, metadata={"help": "Response tokens kept (the first ones) for chosen and rejected answers."}
    )


@dataclass
class OrpoArguments:
    orpo_beta: float | None = field(
        default=None, metadata={"help": "Upstream MedicalGPT's name for --beta (medicalgpt/parser.py ALIASES)."}
    )


@dataclass
class RLArguments:
    """The tutorial's reinforcement-learning flags, shared by PPO, RLOO and GRPO."""

    sft_model_path: str | None = field(default=None, metadata={"help": "The SFT model (or its LoRA adapter dir)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "The reward model from reward_modeling.py (or its LoRA adapter dir)."}
    )
    rl_algorithm: str = field(
        default="ppo", metadata={"help": "ppo (with a critic, our trainer), rloo or grpo (trl's trainers)."}
    )
    max_source_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (the last ones)."})
    response_length: int = field(default=128, metadata={"help": "Most new tokens per sampled response."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts to roll out in all (default: num_train_epochs x prompts)."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the reward of a response that never emits the stop token."}
    )
    reward_funcs: str = field(
        default="reward_model",
        metadata={
            "help": "Comma-separated rewards (rloo/grpo): reward_model, choice_accuracy (exam items: the "
            "option letters the answer commits to), format (Qwen3's <think> block then an answer); weighted by "
            "--reward_weights (e.g. 1 0.2 1). See medicalgpt/rl/verifiable.py."
        },
    )

    def __post_init__(self):
        if self.rl_algorithm not in ("ppo", "rloo", "grpo"):
            raise ValueError(f"--rl_algorithm must be ppo, rloo or grpo, got {self.rl_algorithm!r}")
        names = self.reward_names
        unknown = [name for name in names if name not in ("reward_model", "choice_accuracy", "format")]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(
                f"--reward_funcs must list distinct names among reward_model, choice_accuracy, format; got "
                f"{self.reward_funcs!r}"
            )
        if self.rl_algorithm == "ppo" and names != ["reward_model"]:
            raise ValueError("--reward_funcs other than reward_model need --rl_algorithm grpo or rloo")

    @property
    def reward_names(self):
        return [name.strip() for name in self.reward_funcs.split(",") if name.strip()]
