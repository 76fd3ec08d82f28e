"""The user's mistakes, as exceptions: each is reported by `medicalgpt.cli.run_cli` as one line and exit status 1,
without a traceback. Any other exception is a bug and keeps its traceback.

The floor of the package: it imports nothing from it, so every module can raise these.
"""

MAX_SHOWN = 20  # issues printed in full; the rest are counted


class UsageError(ValueError):
    """A command line that cannot work (missing data, conflicting flags): reported without a traceback."""


class ModelPathError(UsageError):
    """A model path that cannot be loaded: reported on one line, without a traceback (medicalgpt.cli.run_cli)."""


class InputNotFoundError(FileNotFoundError):
    """A file or folder the user named is missing or holds no data: a one-line error (medicalgpt.cli.run_cli),
    unlike a FileNotFoundError from the program's own files, which keeps its traceback."""


class DataValidationError(ValueError):
    """Invalid records: `.errors` holds every problem (medicalgpt.data.validate.Issue, `path:line: ...` as text);
    the message shows the first MAX_SHOWN."""

    def __init__(self, errors):
        self.errors = list(errors)
        lines = [str(error) for error in self.errors[:MAX_SHOWN]]
        if len(self.errors) > MAX_SHOWN:
            lines.append(f"... and {len(self.errors) - MAX_SHOWN} more errors")
        lines.append("Fix these records, or pass --skip_invalid_examples to skip them.")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickles (for multiprocessing) from the issues, not from the message
        return self.__class__, (self.errors,)
