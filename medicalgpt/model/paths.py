"""Model paths checked before anything loads, and adapter base paths that load from any working directory.

A model argument is a local folder or a hub id. transformers takes anything that is not an existing folder for a
hub id: a typo then ends, a minute of download retries later, in a traceback about the hub. Here a path is checked
first and a mistake is one line naming the flag, the path and what to do:

- a local path (`./x`, `/x`, `~/x`, `a/b/c`) that is no folder;
- a hub id (`Qwen/Qwen2.5-0.5B`, also what could be a relative folder: `models/x`) that is neither a folder here nor
  in the hub cache while `HF_HUB_OFFLINE=1`, or while the hub cannot be reached (one request, a few seconds).

An adapter's `adapter_config.json` names its base model. Training records an existing folder as an absolute path
(`recorded_base_path`); an older, relative one is looked up from the working directory, then beside the adapter
(`resolve_adapter_base`), and a base that is gone is reported with the adapter that names it.
"""

import os
import sys

from medicalgpt.errors import ModelPathError

HUB_PROBE_TIMEOUT_S = 5  # one request: a missing network fails in seconds, not after huggingface_hub's retries
EXAMPLE_HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def check_model_path(path, flag=None, cache_dir=None, revision=None, named_by=None):
    """Raise ModelPathError unless `path` is a folder, or a hub id that can be loaded (cached, or the hub answers).

    The message names the flag the user typed `path` after, else `flag`, else "model path";
    `named_by` is the adapter whose adapter_config.json names `path` as its base."""
    if os.path.isdir(path):
        return
    subject = _subject(path, flag, named_by)
    where = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        raise ModelPathError(f"{subject}: {where} is a file; pass the model's folder (with config.json).")
    if path.startswith("~") and os.path.isdir(where):
        raise ModelPathError(f"{subject}: `~` is not expanded here; pass the full path, {where}.")
    if not looks_like_hub_id(path):
        raise ModelPathError(f"{subject}: no such folder ({where}). {_what_to_do(named_by)}")
    if _in_hub_cache(path, revision, cache_dir):
        return
    if _hub_offline():
        advice = (
            "Pass a local model folder, download it first (unset HF_HUB_OFFLINE), or point --cache_dir at the cache "
            "that holds it."
        )
        raise ModelPathError(
            f"{subject}: neither a folder here ({where}) nor a model in the hub cache ({_cache_location(cache_dir)}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading it. {_what_to_do(named_by) if named_by else advice}"
        )
    problem = _probe_hub(path, revision)
    if problem:
        raise ModelPathError(f"{subject}: neither a folder here ({where}) nor in the hub cache, and {problem}")


def looks_like_hub_id(path):
    """`name` or `org/name` as the hub spells ids; `./x`, `/x`, `~/x` and `a/b/c` are local paths."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if path.startswith((".", "~", "/")) or os.sep != "/" and os.sep in path:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _subject(path, flag, named_by):
    if named_by:
        return f"{os.path.join(named_by, 'adapter_config.json')}: base model {path}"
    return f"{flag_of(path) or flag or 'model path'} {path}"


def flag_of(path):
    """The command-line flag the user typed `path` after (`--sft_model_path X` or `--sft_model_path=X`), if any."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[1] == path:
            return arg.split("=", 1)[0]
        if arg.startswith("--") and i + 1 < len(argv) and argv[i + 1] == path:
            return arg
    return None


def _what_to_do(named_by):
    if named_by:
        return (
            "If it was a folder, it has moved or been deleted: pass the base model explicitly (--base_model / "
            "--model_name_or_path), or set base_model_name_or_path in that file."
        )
    return (
        "Pass a folder that exists (a model download, a training run's --output_dir) "
        f"or a hub id such as {EXAMPLE_HUB_ID}."
    )


def _hub_offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cache_location(cache_dir):
    from huggingface_hub import constants

    return cache_dir or constants.HF_HUB_CACHE


def _in_hub_cache(repo_id, revision, cache_dir):
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or an id the cache cannot hold
        return False
    return True


def _probe_hub(repo_id, revision):
    """None when the hub has `repo_id` (or it is gated: the download then reports the login it needs), else why not.
    One request with a short timeout: huggingface_hub's own downloads retry a failing connection for a minute."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return (
            f"the hub has no model {repo_id} (or it is private: `hf auth login`). Check the spelling, "
            f"or pass a local model folder."
        )
    except RevisionNotFoundError:
        return f"the hub's {repo_id} has no revision {revision!r} (--model_revision)."
    except Exception as error:  # connection refused, DNS, timeout, proxy: the hub is out of reach
        return (
            f"the hub ({constants.ENDPOINT}) cannot be reached ({type(error).__name__}). Pass a local model "
            "folder, set HF_ENDPOINT to a mirror you can reach (e.g. "
            "https://hf-mirror.com), or download it where there is a network and set HF_HUB_OFFLINE=1."
        )
    return None


def resolve_adapter_base(adapter_dir, recorded):
    """The base an adapter names, as a path that loads from here. An absolute path or hub id is returned as
    recorded; a relative folder is looked up from the working directory, then beside the adapter (chained runs
    write their outputs side by side). A base found nowhere is returned as recorded, for check_model_path."""
    if os.path.isabs(recorded) or os.path.isdir(recorded):
        return recorded
    beside = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), os.path.basename(os.path.normpath(recorded)))
    return beside if os.path.isdir(beside) else recorded


def recorded_base_path(path):
    """What an adapter records as its base: an existing folder as an absolute path (loadable from anywhere), a hub
    id as it is."""
    return os.path.abspath(path) if path and os.path.isdir(path) else path
