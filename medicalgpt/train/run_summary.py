"""What a training run says before its first progress bar: a summary of a few lines, and every argument in a file.

When training begins (a TrainerCallback's `on_train_begin`: the trainer then knows its steps and processes), the main
process writes `output_dir/run_args.json` (every option of every argument group, the command line, the library
versions) and logs one record:

    supervised_finetuning.py: models/tiny-qwen -> out
      model      Qwen2ForCausalLM, 282,688 parameters, float32
      method     LoRA r=8, alpha=16 on q_proj, k_proj, v_proj, o_proj, ...: 16,384 trainable parameters (5.80%)
      data       180 rows for training, 4 for evaluation; 230 tokens a row on average
      batch      2 rows per device x 1 process x 1 accumulation = 2 rows a step, ~460 tokens a step
      steps      3 (--max_steps), 0.03 epochs
      precision  Mixed precision: no autocast (default on CPU; ...). Gradient checkpointing: off (...).
      arguments  out/run_args.json (--verbose logs them too)

Nothing is written before training begins: a run stopped by a mistake leaves no output folder behind.
"""

import dataclasses
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import sys

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from medicalgpt.device import describe_choice

logger = logging.getLogger("medicalgpt")

RUN_ARGS_FILE = "run_args.json"
LENGTH_SAMPLE = 1000  # rows whose mean length estimates the tokens of a step
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def add_run_summary(trainer, *arguments):
    """Have `trainer` log the summary and write run_args.json when training begins. `arguments`: the script's parsed
    dataclasses (the trainer's own config is read from the trainer); the script named is the caller's file. The
    summary's callback goes before the progress bar's (Trainer.pop_callback / add_callback), so the summary is printed
    before the bar starts."""
    caller = inspect.currentframe().f_back.f_globals.get("__file__") or sys.argv[0]
    script = os.path.basename(caller)
    if not hasattr(trainer, "add_callback"):  # PPO's own trainer (medicalgpt/rl/trainer.py): summarised now
        if trainer.config.do_train and trainer.accelerator.is_main_process:
            log_ppo_summary(trainer, script, arguments)
        return
    bars = [trainer.pop_callback(bar) for bar in (ProgressCallback, PrinterCallback)]
    trainer.add_callback(RunSummaryCallback(trainer, *arguments, script=script))
    for bar in bars:
        if bar is not None:
            trainer.add_callback(bar)


class RunSummaryCallback(TrainerCallback):
    """The summary and run_args.json when training begins (see add_run_summary)."""

    def __init__(self, trainer, *arguments, script):
        self.trainer = trainer
        self.arguments = arguments
        self.script = script

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        train, evaluation = self.trainer.train_dataset, self.trainer.eval_dataset
        tokens = mean_row_tokens(train)
        budget = "--max_steps" if args.max_steps > 0 else f"{state.num_train_epochs:g} epochs"
        log_run_summary(
            self.script,
            self.arguments,
            model=model,
            args=args,
            steps=f"{state.max_steps:,} ({budget})",
            data=data_line(dataset_rows(train), dataset_rows(evaluation), tokens),
            tokens_per_row=tokens,
        )


def log_ppo_summary(trainer, script, arguments):
    """The summary of PPO's own trainer, in its units: prompts, and PPO updates of `global_batch` prompts."""
    log_run_summary(
        script,
        arguments,
        model=trainer.unwrapped.policy,  # trainer.model is wrapped (DDP, DeepSpeed) on several processes
        args=trainer.config,
        steps=f"{trainer.num_updates:,} PPO updates of {trainer.global_batch:,} prompts",
        data=f"{len(trainer.train_prompts):,} prompts for training, {len(trainer.eval_prompts):,} for evaluation",
        unit="prompts",
    )


def log_run_summary(script, arguments, model, args, steps, data, tokens_per_row=None, unit="rows"):
    """Write run_args.json, then log the summary: what trains, on what, how much, how, and where the rest is."""
    run_args = write_run_args(args.output_dir, script, args, *arguments)
    world_size = args.world_size
    per_step = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    tokens = f", ~{round(tokens_per_row * per_step):,} tokens a step" if tokens_per_row else ""
    lines = [
        f"{script}: {model_name(model)} -> {args.output_dir}",
        f"model      {describe_model(model)}",
        f"method     {describe_method(model)}",
        f"data       {data}",
        f"batch      {args.per_device_train_batch_size} {unit} per device x {world_size} process(es) x "
        f"{args.gradient_accumulation_steps} accumulation = {per_step} {unit} a step{tokens}",
        f"steps      {steps}",
        f"precision  {describe_choice(args)}",
        f"arguments  {run_args} (--verbose logs them too)",
    ]
    logger.info("\n  ".join(lines))


def data_line(train_rows, eval_rows, tokens_per_row, unit="rows"):
    train = "streamed" if train_rows is None else f"{train_rows:,}"
    evaluation = f", {eval_rows:,} for evaluation" if eval_rows else ""
    length = f"; {tokens_per_row:,.0f} tokens a row on average" if tokens_per_row else ""
    return f"{train} {unit} for training{evaluation}{length}"


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_name(model):
    base = base_model(model)
    return getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", "") or type(base).__name__


def describe_model(model):
    base = base_model(model)
    total = sum(p.numel() for p in model.parameters())
    quantised = " (4-bit)" if getattr(base, "is_loaded_in_4bit", False) else ""
    quantised = " (8-bit)" if getattr(base, "is_loaded_in_8bit", False) else quantised
    dtype = str(getattr(base, "dtype", "")).removeprefix("torch.")
    return f"{type(base).__name__}, {total:,} parameters, {dtype}{quantised}"


def describe_method(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = f"{trainable:,} trainable parameters ({100 * trainable / max(total, 1):.2f}%)"
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return f"full fine-tuning: {share}"
    targets = config.target_modules
    if isinstance(targets, set | list | tuple):  # full module paths for `--target_modules all`: their kinds
        targets = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in targets}))
    kind = "QLoRA" if getattr(base_model(model), "is_loaded_in_4bit", False) else "LoRA"
    return f"{kind} r={config.r}, alpha={config.lora_alpha:g} on {targets}: {share}"


def dataset_rows(dataset):
    """The number of rows, or None for a stream (or no dataset)."""
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


# The token columns of a training row and how often the model reads each: a preference pair's prompt is read with each
# answer (our pre-tokenised pairs), or is already inside both sequences (trl's tokenised pairs).
TOKEN_COLUMNS = (
    {"input_ids": 1},
    {"chosen_input_ids": 1, "rejected_input_ids": 1},
    {"prompt_ids": 2, "chosen_ids": 1, "rejected_ids": 1},
    {"chosen_ids": 1, "rejected_ids": 1},
)


def mean_row_tokens(dataset):
    """Mean tokens the model reads for one training row, over the first LENGTH_SAMPLE rows; None for a stream."""
    rows = dataset_rows(dataset)
    names = set(getattr(dataset, "column_names", None) or ())
    columns = next((weights for weights in TOKEN_COLUMNS if set(weights) <= names), None)
    if not rows or not columns:
        return None
    sample = dataset.select(range(min(rows, LENGTH_SAMPLE)))
    return sum(weight * sum(map(len, sample[name])) for name, weight in columns.items()) / len(sample)


def write_run_args(output_dir, script, training_args, *arguments):
    """output_dir/run_args.json: the command line, the library versions and every argument, grouped as parsed."""
    groups = {type(group).__name__: dataclasses.asdict(group) for group in arguments if group is not None}
    record = {
        "script": script,
        "command": sys.argv,
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
        "arguments": {type(training_args).__name__: training_args.to_dict(), **groups},
    }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_ARGS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False, default=str)
    return path


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
