"""Command line and config-file parsing for every stage.

    python supervised_finetuning.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct ...
    python supervised_finetuning.py my_run.yaml --learning_rate 1e-5      # file first, the command line wins

Built on transformers' HfArgumentParser. On top of it: a YAML/JSON config file, the tutorial's flags that
transformers 5 dropped (`LegacyArguments`), an unknown flag or config key rejected by name, CPU training when no
GPU is present, fields shared between our dataclasses and the trainer's config parsed once, and one table of
upstream's flag aliases and of options derived from others (`ALIASES`, `DERIVED`): the stage scripts only read
their arguments.
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from medicalgpt.args import LegacyArguments
from medicalgpt.console import ConsoleArguments, set_verbose
from medicalgpt.device import fit_to_device
from medicalgpt.loss_types import check_loss_options, given_options, loss_table

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_args(config_class, *dataclass_types, argv=None, description=None):
    """Parse `argv` into (config, *dataclass instances) in the order given; exits with a message on bad input.
    `--help` shows `description` (default: the calling script's docstring), then the script's own options, then the
    trainer's (`config_class`), then upstream's legacy flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if description is None:
        description = inspect.currentframe().f_back.f_globals.get("__doc__")
    description = "\n".join(filter(None, [description, loss_table(config_class)]))  # which --loss_type when
    shared = {f.name for f in dataclasses.fields(config_class)}
    ours = [_without_fields(cls, shared) for cls in dataclass_types]
    training = f"training ({config_class.__name__}: the trainer's options, as transformers / trl document them)"
    parsed_types = [*map(_as_group, ours), _as_group(ConsoleArguments), _as_group(config_class, training)]
    parsed_types.append(_as_group(LegacyArguments))
    parser = HfArgumentParser(parsed_types, allow_abbrev=False, **help_options(description, config_file=True))
    _allow_bare_bool_flags(parser)
    try:
        argv = expand_config_file(argv)
    except (OSError, ValueError, yaml.YAMLError) as error:
        _fail(str(error))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _fail(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    set_verbose(values.pop("verbose"))
    try:
        legacy = _build(LegacyArguments, values)
        _apply_legacy_flags(legacy, values)
        _default_to_cpu(values)
        fit_to_device(values, argv)  # bf16 and gradient checkpointing where they help (medicalgpt/device.py)
        resolve_aliases(values)
        config = _build(config_class, values)
        others = [_build(cls, {**values, **_shared_values(cls, config)}) for cls in dataclass_types]
    except ValueError as error:
        _fail(str(error))
    config.overwrite_output_dir = legacy.overwrite_output_dir
    check_loss_options(config, given_options(argv))  # UsageError: a loss type that cannot work with the options
    return (config, *others)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` that reads: the description laid out as written (examples keep their line breaks), each option once
    (`--model_name_or_path VALUE`, not also its dashed alias) and one `(default: ...)`, added only where the help text
    does not already state its default."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=40, width=119)

    def _format_action_invocation(self, action):  # argparse's hook for the "-x, --xx XX" column
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = []  # each spelling once: --model_name_or_path, not also HfArgumentParser's --model-name-or-path
        for name in action.option_strings:
            if name.replace("-", "_").lstrip("_") not in [n.replace("-", "_").lstrip("_") for n in names]:
                names.append(name)
        if action.nargs == 0:
            return ", ".join(names)
        value = "[BOOL]" if action.nargs == "?" and action.const is True else "VALUE"
        if action.choices:
            value = "{" + ",".join(map(str, action.choices)) + "}"
        return f"{', '.join(names)} {value}{' ...' if action.nargs in ('+', '*') else ''}"

    def _get_help_string(self, action):  # the hook argparse's ArgumentDefaultsHelpFormatter overrides, too
        text = action.help or ""
        negation = action.nargs == 0 and action.const is False  # --no_x: its default is --x's
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        if negation:
            return text
        return f"{text} (default: %(default)s)"


def help_options(description, config_file=False):
    """HfArgumentParser keyword arguments for readable help: a one-line usage instead of every flag listed."""
    usage = "%(prog)s [run.yaml] [--option VALUE ...]" if config_file else "%(prog)s [--option VALUE ...]"
    return dict(description=description, usage=usage, formatter_class=HelpFormatter)


@dataclasses.dataclass(frozen=True)
class Alias:
    """`--name`, when given, sets `--target` too: to `value`, or to its own value when `value` is None. With
    `fills_only`, a target given itself is kept."""

    name: str
    target: str
    value: object = None
    fills_only: bool = False


# Upstream MedicalGPT's flag names, resolved once here. Each applies where the script parses both fields.
ALIASES = (
    Alias("orpo_beta", "beta"),  # orpo_training.py: upstream's name for trl's --beta
    Alias("sft_model_path", "model_name_or_path"),  # ppo_training.py: the policy is the SFT model
    Alias("qlora", "load_in_4bit", True),  # upstream's QLoRA switch: 4-bit weights...
    Alias("qlora", "use_peft", True),  # ...with a LoRA adapter trained on them
    Alias("peft_path", "use_peft", True),  # continuing an adapter is LoRA training
    Alias("flash_attn", "attn_implementation", "flash_attention_2", fills_only=True),  # sdpa without CUDA (modeling)
    Alias("model_max_length", "max_length"),  # SFT: upstream's name for trl's --max_length
    Alias("preprocessing_num_workers", "dataset_num_proc"),  # trl tokenises with our worker count
)


@dataclasses.dataclass(frozen=True)
class Derived:
    """`option` computed from `inputs` by `rule`: when left unset (None), or always with `always`."""

    option: str
    inputs: tuple
    rule: object
    always: bool = False


# Options that follow from others, applied after the aliases where the script parses every field named.
DERIVED = (
    # RM, DPO, ORPO: a pair is at most its prompt and its answer (both cut in medicalgpt/processors/)
    Derived(
        "max_length", ("max_source_length", "max_target_length"), lambda prompt, answer: prompt + answer, always=True
    ),
    # SFT cuts conversations to --model_max_length, which is trl's --max_length unless given
    Derived("model_max_length", ("max_length",), lambda length: length),
    # non-reentrant checkpointing works with frozen inputs (LoRA) and under DDP without extra flags
    Derived(
        "activation_checkpointing_kwargs",
        ("activation_checkpointing",),
        lambda on: {"use_reentrant": False} if on else None,
    ),
)


# The tutorial's names for what transformers 5.23 calls activation checkpointing. Its TrainingArguments warns
# (FutureWarning) whenever `gradient_checkpointing*` is not None, and trl 1.16's configs default it to True: the value
# moves to the new name, the old one is left None, and TrainingArguments mirrors it back (so
# `training_args.gradient_checkpointing` still reads it).
CHECKPOINTING_NAMES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def resolve_checkpointing_names(values):
    """`--gradient_checkpointing` (given, or the config's default) as `activation_checkpointing` unless that is set."""
    for old, new in CHECKPOINTING_NAMES:
        if old in values and new in values:
            if values[new] is None:
                values[new] = values[old]
            values[old] = None
    return values


def resolve_aliases(values):
    """Apply `ALIASES`, then `DERIVED`, to the parsed `values` (one flat dict of every option)."""
    resolve_checkpointing_names(values)
    for alias in ALIASES:
        given = values.get(alias.name) not in (None, False)
        if given and alias.target in values and not (alias.fills_only and values[alias.target] is not None):
            values[alias.target] = values[alias.name] if alias.value is None else alias.value
    for derived in DERIVED:
        known = derived.option in values and all(name in values for name in derived.inputs)
        if known and (derived.always or values[derived.option] is None):
            values[derived.option] = derived.rule(*(values[name] for name in derived.inputs))
    return values


GROUP_TITLES = {
    "ModelArguments": "model",
    "DataArguments": "data",
    "LoraArguments": "LoRA / QLoRA",
    "LegacyArguments": "upstream flags, accepted for compatibility",
}


def _as_group(cls, title=None):
    """`cls` with HfArgumentParser's `_argument_group_name` (see its docstring): its options are one --help section."""
    name = cls.__name__
    title = title or GROUP_TITLES.get(name) or re.sub(r"(?<!^)(?=[A-Z])", " ", name.removesuffix("Arguments")).lower()
    return type(name, (cls,), {"_argument_group_name": title, "__doc__": cls.__doc__})


def _allow_bare_bool_flags(parser):
    """`--bf16` alone means True, also for trl's `bool | None` fields that HfArgumentParser gives no const."""
    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True


def _fail(message):
    """argparse's error without its 200-line usage dump."""
    prog = os.path.basename(sys.argv[0]) or "script"
    print(f"{prog}: error: {message}\nRun `{prog} --help` to list the options.", file=sys.stderr)
    sys.exit(2)


def _without_fields(cls, names):
    """A copy of dataclass `cls` without the fields in `names` (they are parsed by the config class instead)."""
    kept = [(f.name, f.type, f) for f in dataclasses.fields(cls) if f.name not in names]
    if len(kept) == len(dataclasses.fields(cls)):
        return cls
    return dataclasses.make_dataclass(cls.__name__, kept)


def _shared_values(cls, config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}


def _build(cls, values):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{name: value for name, value in values.items() if name in names})


def expand_config_file(argv):
    """`script.py run.yaml --flag x` -> the file's keys as flags, followed by the command line (which wins)."""
    if not argv or not argv[0].endswith(CONFIG_SUFFIXES) or argv[0].startswith("-"):
        return argv
    path = Path(argv[0])
    text = path.read_text(encoding="utf-8")
    config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return _config_to_argv(config) + argv[1:]


def _config_to_argv(config):
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(item) for item in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def _apply_legacy_flags(legacy, values):
    if legacy.group_by_length:
        values["train_sampling_strategy"] = "group_by_length"
    if legacy.warmup_ratio is not None:
        if not 0 <= legacy.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {legacy.warmup_ratio}")
        values["warmup_steps"] = legacy.warmup_ratio
    if legacy.no_cuda:
        values["use_cpu"] = True
    if legacy.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = legacy.logging_dir


def _default_to_cpu(values):
    """Without a GPU, train on the CPU: under torchrun that also makes the ranks one gloo process group."""
    import torch

    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if "use_cpu" in values and not has_gpu:
        values["use_cpu"] = True


def parse_cli(dataclass_types, argv=None, description=None):
    """HfArgumentParser over `dataclass_types` (and --verbose); a bad value exits with argparse's message, not a
    traceback."""
    parser = HfArgumentParser([*dataclass_types, ConsoleArguments], allow_abbrev=False, **help_options(description))
    try:
        *parsed, console = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))
    set_verbose(console.verbose)
    return tuple(parsed)
