"""Command line and config-file parsing for every stage.

    python supervised_finetuning.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct ...
    python supervised_finetuning.py my_run.yaml --learning_rate 1e-5      # file first, the command line wins

Built on transformers' HfArgumentParser. On top of it: a YAML/JSON config file, the tutorial's flags that
transformers 5 dropped (`LegacyArguments`), an unknown flag or config key rejected by name, CPU training when no
GPU is present, and fields shared between our dataclasses and the trainer's config parsed once.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from medicalgpt.args import LegacyArguments
from medicalgpt.device import fit_to_device

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_args(config_class, *dataclass_types, argv=None):
    """Parse `argv` into (config, *dataclass instances) in the order given; exits with a message on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = {f.name for f in dataclasses.fields(config_class)}
    parsed_types = [config_class] + [_without_fields(cls, shared) for cls in dataclass_types] + [LegacyArguments]
    parser = HfArgumentParser(parsed_types, allow_abbrev=False)
    _allow_bare_bool_flags(parser)
    try:
        argv = expand_config_file(argv)
    except (OSError, ValueError, yaml.YAMLError) as error:
        _fail(str(error))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _fail(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    try:
        legacy = _build(LegacyArguments, values)
        _apply_legacy_flags(legacy, values)
        _default_to_cpu(values)
        fit_to_device(values, argv)  # bf16 and gradient checkpointing where they help (medicalgpt/device.py)
        config = _build(config_class, values)
        others = [_build(cls, {**values, **_shared_values(cls, config)}) for cls in dataclass_types]
    except ValueError as error:
        _fail(str(error))
    config.overwrite_output_dir = legacy.overwrite_output_dir
    return (config, *others)


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
