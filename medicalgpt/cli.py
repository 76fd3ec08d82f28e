"""What every command-line entry point shares: the one-line error for the user's mistakes, and logging."""

import atexit
import logging
import os
import sys
import threading

import datasets
import transformers

from medicalgpt.console import is_verbose
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_without_teardown()
    return 0


def leave_without_teardown():
    """End a rank of a multi-process run whose work is done (outputs written, the process group left) without the
    interpreter's teardown. With torch 2.13 and gloo the group's worker threads outlive it (DDP's C++ side keeps a
    reference), and one that releases a finished collective's tensors while the interpreter finalizes needs the GIL
    then, leaves its thread through C++ frames, and the process aborts ("terminate called without an active
    exception", gloo's runLoop in the core dump): a successful run that torchrun reports as failed, seen under load.
    Everything a normal exit does for the program still happens: other threads are joined, atexit handlers run
    (logging is flushed by one), and the standard streams are flushed."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs (CPython's atexit, unchanged since Python 3)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def setup_logging(training_args=None):
    """English logs through `logging`. Tools (chat, merge, evaluation) log ours at INFO. Training logs ours at INFO
    from the main process and warnings only from the others; `--log_level` sets both ours and the libraries' (which
    stay at WARNING otherwise). `--verbose` (medicalgpt/console.py) adds our debug lines on the main process."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    ours_main = logging.DEBUG if is_verbose() else logging.INFO  # on the main process, unless --log_level says
    if training_args is None:
        logging.getLogger("medicalgpt").setLevel(ours_main)
        return
    explicit = training_args.log_level if training_args.should_log else training_args.log_level_replica
    explicit = None if explicit == "passive" else transformers.utils.logging.log_levels[explicit]
    ours = explicit or (ours_main if training_args.should_log else logging.WARNING)
    for name in ("medicalgpt", "template"):
        logging.getLogger(name).setLevel(ours)
    libraries = explicit or logging.WARNING
    datasets.utils.logging.set_verbosity(libraries)
    transformers.utils.logging.set_verbosity(libraries)
