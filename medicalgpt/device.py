"""Defaults that fit the device: mixed precision and gradient checkpointing where they help, not where they cost.

trl's configs turn bf16 autocast and gradient checkpointing on by default. On a CUDA GPU with bf16 support both help:
bf16 runs on the tensor cores, and checkpointing trades ~20% more compute for much less activation memory. On a CPU
both cost: bf16 autocast made an SFT step ~5x slower on 2 cores (4 steps: 16.4 s against 3.1 s in float32), and
checkpointing recomputes every forward with no GPU memory to save. So, unless a flag says otherwise:

- `bf16` autocast is on on CUDA with bf16 support; `fp16` autocast (with loss scaling) on CUDA without it (V100, T4):
  the trainable weights are float32 whatever the checkpoint's dtype (medicalgpt/precision.py), so fp16's gradient
  scaler has float32 weights to unscale into.
- `gradient_checkpointing` is off on the CPU; on a GPU it keeps the config's default (trl's: on; transformers'
  TrainingArguments, used by pretraining and PPO: off).

A flag given on the command line or in a config file (`--bf16`, `--bf16 False`, `--gradient_checkpointing True`) is
always kept: the tutorial's explicit `--bf16` keeps its meaning. The choice is logged once by
`medicalgpt.train.run.check_and_log_args` (`describe_choice`).
"""

PRECISION_FLAGS = ("bf16", "fp16")
CHECKPOINTING_FLAG = "gradient_checkpointing"

_defaulted = set()  # the flags the last fit_to_device call chose, for describe_choice


def given_flags(argv):
    """Option names in `argv` (config file already expanded), `--no_x` counted as `x`."""
    names = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    return names | {name[3:] for name in names if name.startswith("no_")}


def device_kind(values):
    """cuda-bf16, cuda, accelerator (XPU, MPS, ...) or cpu: where the Trainer will put the model."""
    import torch

    if values.get("use_cpu"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda-bf16" if torch.cuda.is_bf16_supported() else "cuda"
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return "accelerator" if has_xpu or torch.backends.mps.is_available() else "cpu"


def fit_to_device(values, argv, kind=None):
    """Set bf16 and gradient checkpointing in the parsed `values` for the device, unless `argv` gives them."""
    kind = kind or device_kind(values)
    given = given_flags(argv)
    _defaulted.clear()
    if "bf16" in values and not given & set(PRECISION_FLAGS):
        values["bf16"] = kind == "cuda-bf16"
        if "fp16" in values:
            values["fp16"] = kind == "cuda"
        _defaulted.add("bf16")
    if CHECKPOINTING_FLAG in values and CHECKPOINTING_FLAG not in given and kind == "cpu":
        values[CHECKPOINTING_FLAG] = False
        _defaulted.add(CHECKPOINTING_FLAG)
    return values


def describe_choice(training_args):
    """One line: the precision and checkpointing in effect, and whether they are the device's default or a flag."""
    precision = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "no autocast"
    checkpointing = "on" if training_args.gradient_checkpointing else "off"
    device = "CPU" if training_args.use_cpu else "this device"

    def origin(name, flag):
        return f"default on {device}; {flag} to change" if name in _defaulted else "as given"

    return (
        f"Mixed precision: {precision} ({origin('bf16', '--bf16 / --fp16 True/False')}). "
        f"Gradient checkpointing: {checkpointing} ({origin(CHECKPOINTING_FLAG, '--gradient_checkpointing True')})."
    )
