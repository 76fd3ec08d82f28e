"""What every command-line entry point shares: the one-line error for the user's mistakes, and logging."""

import logging
import sys

import datasets
import transformers

from medicalgpt.errors import DataValidationError, InputNotFoundError, UsageError

logger = logging.getLogger("medicalgpt")


def run_cli(main):
    """Run a script's main(); the user's mistakes (bad data, bad flags, a named file or folder that is missing) end
    with their one-line message and exit status 1. Any other exception, a FileNotFoundError from the program's own
    files included, is a bug and keeps its traceback."""
    try:
        main()
    except (DataValidationError, UsageError, InputNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def setup_logging(training_args=None):
    """English logs through `logging`. Tools (chat, merge, evaluation) log ours at INFO. Training logs ours at INFO
    from the main process and warnings only from the others; `--log_level` sets both ours and the libraries' (which
    stay at WARNING otherwise)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    if training_args is None:
        logging.getLogger("medicalgpt").setLevel(logging.INFO)
        return
    explicit = training_args.log_level if training_args.should_log else training_args.log_level_replica
    explicit = None if explicit == "passive" else transformers.utils.logging.log_levels[explicit]
    ours = explicit or (logging.INFO if training_args.should_log else logging.WARNING)
    for name in ("medicalgpt", "template"):
        logging.getLogger(name).setLevel(ours)
    libraries = explicit or logging.WARNING
    datasets.utils.logging.set_verbosity(libraries)
    transformers.utils.logging.set_verbosity(libraries)
