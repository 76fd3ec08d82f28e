"""What a person sees on the console: our own lines, the warnings to act on, and nothing else unless asked.

Every script imports this module first, before transformers, trl or peft load (importing it is what installs the
filters below). Some libraries speak before any line of ours, about optional packages nobody asked for:

- peft 0.21.2 imports bitsandbytes in `peft/helpers.py` whenever it is installed, quantised or not, and
  bitsandbytes 0.50.2 then logs that it could not fetch a faster CPU 4-bit kernel from the hub
  (`bitsandbytes/backends/cpu/ops.py`);
- accelerate 1.15 imports DeepSpeed whenever it is installed (`extract_model_from_parallel`, on every trainer), and
  DeepSpeed 0.19.8 prints that it set its accelerator to the CPU (`accelerator/real_accelerator.py`): our run
  summary already says where training runs;
- peft 0.21.2 reads transformers 5.23's deprecated `is_gradient_checkpointing` (`peft/peft_model.py`), a
  FutureWarning on every LoRA run that nobody but peft can fix;
- transformers 5.23 reports, in a 7-line table (`utils/loading_report.py`), that a reward model built from a causal
  LM has a new `score` head: that is what reward modeling starts from. Any other key in the report keeps it shown;
- trl 1.16 warns on importing `trl.experimental` (ORPO, GKD): its documented TRL_EXPERIMENTAL_SILENCE=1 is set.

These notices are held back, by exact logger name and message start, and shown with `--verbose` (or
MEDICALGPT_VERBOSE=1), which also shows our debug lines: the full arguments, the records read, the first sample.
vLLM is never imported by us; trl 1.16 only looks it up (`importlib.util.find_spec`). Everything else a library
warns about stays visible. tests/test_console.py fails when one of these libraries changes what it says.
"""

import logging
import os
import warnings
from dataclasses import dataclass, field


def _new_reward_head_only(message):
    """A transformers load report whose only rows are the missing `score` head of a sequence-classification model."""
    if "ForSequenceClassification LOAD REPORT" not in message:
        return False
    rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2 and not line.startswith("Key")]
    keys = [(row[0].strip(), row[1].strip()) for row in rows if row[0].strip() and not row[0].startswith("-")]
    return bool(keys) and all(key.startswith("score.") and status == "MISSING" for key, status in keys)


# (logger name, test of the message) of the notices held back
HELD_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", lambda m: m.startswith("Failed to load CPU gemm_4bit_forward from kernels-com")),
    ("DeepSpeed", lambda m: m.startswith("Setting accelerator to CPU.")),
    ("transformers.modeling_utils", _new_reward_head_only),
)
# FutureWarnings that libraries raise on each other's calls (regular expressions, matched at the message start)
LIBRARY_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)

_state = {"verbose": False}
_held = []  # records held back while not verbose, replayed by set_verbose(True)


@dataclass
class ConsoleArguments:
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Show everything: the full arguments, records read, the first training sample, and the "
            "libraries' own notices (also MEDICALGPT_VERBOSE=1)."
        },
    )


class HoldNotice(logging.Filter):
    """Holds back the records of one logger whose message `matches`, unless verbose."""

    def __init__(self, matches):
        super().__init__()
        self.matches = matches

    def filter(self, record):
        if is_verbose() or not self.matches(record.getMessage()):
            return True
        _held.append(record)
        return False


def is_verbose():
    return _state["verbose"]


def set_verbose(verbose):
    """Verbosity for this process (on also with MEDICALGPT_VERBOSE=1): on, the held notices are shown now and the
    library warnings pass."""
    _state["verbose"] = bool(verbose) or os.environ.get("MEDICALGPT_VERBOSE", "") not in ("", "0")
    action = "default" if is_verbose() else "ignore"
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings(action, message=pattern, category=FutureWarning)
    if is_verbose():
        while _held:
            record = _held.pop(0)
            logging.getLogger(record.name).handle(record)


def _install():
    for name, matches in HELD_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HoldNotice) and f.matches is matches for f in logger.filters):
            logger.addFilter(HoldNotice(matches))
    set_verbose(False)
    if not is_verbose():
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


_install()
