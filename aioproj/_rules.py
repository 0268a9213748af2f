"""What every tracking store accepts: keys, text and run ids, with MLflow's limits.

These rules sit at the bottom of aioproj so that the MLproject spec (declared parameter
names must be keys a store takes), the runner (a run's strings, checked before anything is
made) and every store (checked again when written) apply the same ones without importing
the tracking layer. :mod:`aioproj.tracking.base` exports them too.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Mapping

from aioproj._redact import redact_credentials
from aioproj.errors import InvalidArgumentError

__all__ = [
    "MAX_EXPERIMENT_NAME_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_RUN_NAME_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "check_layout",
    "check_record",
    "check_run_id",
    "check_text",
    "validate_key",
]

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
#: MLflow's limit on experiment names (it refuses longer ones).
MAX_EXPERIMENT_NAME_LENGTH = 500
#: The run name column of MLflow's SQL schema (``runs.name``, VARCHAR(250)): a tracking
#: server on PostgreSQL or MySQL refuses longer names.
MAX_RUN_NAME_LENGTH = 250

# Keys become file names in the file store, so every store accepts the same small alphabet.
# (fullmatch, not ``$``: ``$`` also matches before a trailing newline.)
_KEY_CHARS = re.compile(r"[/\w.\- ]*" if sys.platform == "win32" else r"[/\w.\- :]*")


def validate_key(kind: str, key: str) -> None:
    """Check a param or tag key as MLflow does.

    Raises:
        InvalidArgumentError: the key is empty, too long, has characters outside
            alphanumerics, ``_ - . : /`` and space, is not a normalised relative path
            (``..``, a leading ``/``, ``a//b``, a trailing ``/``), or has a part between
            slashes longer than a file name may be (255 bytes in UTF-8: 250 letters such
            as ``é`` are 500).
    """
    if not key:
        raise InvalidArgumentError(f"Invalid {kind} key {key!r}: a key name must be provided.")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgumentError(
            f"Invalid {kind} key {key[:50]!r}...: longer than {MAX_KEY_LENGTH} characters."
        )
    if not _KEY_CHARS.fullmatch(key):
        raise InvalidArgumentError(
            f"Invalid {kind} key {key!r}: names may only contain alphanumerics, underscores (_),"
            " dashes (-), periods (.), spaces ( ), colons (:) and slashes (/)."
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        raise InvalidArgumentError(
            f"Invalid {kind} key {key!r}: keys are stored as file paths and must not resolve"
            f" to another name (this one resolves to {norm!r})."
        )
    if any(len(part.encode("utf-8")) > _NAME_MAX for part in key.split("/")):
        raise InvalidArgumentError(
            f"Invalid {kind} key {key[:50]!r}...: keys are stored as file names, and a part"
            f" of it between slashes is longer than {_NAME_MAX} bytes (UTF-8)."
        )


#: The longest file name (in bytes) common file systems take (ext4, xfs, btrfs, APFS).
_NAME_MAX = 255


def check_layout(kind: str, keys: list[str]) -> None:
    """Refuse keys that cannot be files side by side: ``a`` and ``a/b`` (``a`` would be a
    file and a directory)."""
    taken = set(keys)
    for key in keys:
        parent = key.rpartition("/")[0]
        while parent:
            if parent in taken:
                raise InvalidArgumentError(
                    f"Invalid {kind} keys {parent!r} and {key!r}: keys are stored as file paths,"
                    f" and {parent!r} cannot be both a value and a folder of values."
                )
            parent = parent.rpartition("/")[0]


def check_text(what: str, value: object, *, limit: int | None = None) -> str:
    """Check a string a store will write (a run or experiment name, a tag or param value).

    Returns ``value``. Every store takes text as UTF-8 and a SQL database refuses NUL, so
    both are checked here, before anything is written, the same way for every store.

    Raises:
        InvalidArgumentError: ``value`` is not a string, holds a NUL or a lone surrogate
            (text that cannot be encoded as UTF-8, such as an undecodable file name), or
            is longer than ``limit`` characters; the message names ``what``.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"Invalid {what}: a string is needed, got {type(value).__name__}."
        )
    problem = None
    if "\0" in value:
        problem = "holds a NUL character"
    elif limit is not None and len(value) > limit:
        problem = f"is {len(value)} characters long; the limit is {limit}"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            problem = (
                f"holds a lone surrogate ({value[exc.start]!r} at position {exc.start}) that "
                "cannot be written as UTF-8"
            )
    if problem is not None:
        raise InvalidArgumentError(
            f"Invalid {what} {_shown(value)}: it {problem}; no tracking store can record it."
        )
    return value


def _shown(value: str) -> str:
    """A value for a message: shortened, credentials removed, surrogates escaped."""
    text = repr(value if len(value) <= 60 else f"{value[:50]}...{value[-5:]}")
    return redact_credentials(text)


def check_record(
    *,
    run_name: str | None = None,
    experiment_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> None:
    """Check every user string of a run before anything of it is written.

    The runner calls it before it builds an environment, creates an experiment or a run;
    every store checks the same again when it writes (:func:`check_tags`,
    :func:`check_params`, :func:`named_run_tags`, :func:`choose_experiment`).

    Raises:
        InvalidArgumentError: a name, key or value that :func:`check_text` or
            :func:`validate_key` refuses.
    """
    if run_name is not None:
        check_text("run name", run_name, limit=MAX_RUN_NAME_LENGTH)
    if experiment_name is not None:
        check_text("experiment name", experiment_name, limit=MAX_EXPERIMENT_NAME_LENGTH)
    for kind, values in (("tag", tags), ("param", params)):
        for key, value in (values or {}).items():
            validate_key(kind, key)
            check_text(f"value of {kind} {key!r}", value)
        check_layout(kind, list(values or {}))


_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")


def check_run_id(run_id: str) -> None:
    """Check that ``run_id`` looks like a run id of any MLflow store (letters, digits,
    ``-`` and ``_``), so that it can go into a search filter or a path.

    Raises:
        InvalidArgumentError: it does not.
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidArgumentError(f"Invalid run id {run_id!r}.")
