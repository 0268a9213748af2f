"""The tracking store interface of aioproj and the rules every store shares.

A store records runs the way MLflow does: an experiment, a run with tags and params, a
final status with an end time, and artifacts. The runner talks to stores only through
:class:`TrackingStore`, so the file store, the REST store and the mlflow adapter are
interchangeable.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from aioproj._redact import redact_credentials
from aioproj._rules import (
    MAX_EXPERIMENT_NAME_LENGTH,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_RUN_NAME_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    check_layout,
    check_record,
    check_run_id,
    check_text,
    validate_key,
)
from aioproj.errors import InvalidArgumentError

if TYPE_CHECKING:
    from aioproj.tracking.metrics import Metric, MetricCursor

__all__ = [
    "CLIENT_KEY_TAG",
    "MAX_EXPERIMENT_NAME_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_RUN_NAME_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "PARENT_RUN_TAG",
    "RUN_NAME_TAG",
    "TERMINAL_STATUSES",
    "USER_TAG",
    "RunRecord",
    "TrackingStore",
    "check_params",
    "check_record",
    "check_run_id",
    "check_tags",
    "check_text",
    "current_user",
    "generate_run_name",
    "validate_key",
]

_log = logging.getLogger("aioproj.tracking")

RUN_NAME_TAG = "mlflow.runName"
#: The tag that carries a run's journal key on stores that choose the run id themselves
#: (a tracking server, a database), so a create whose answer was lost can be found.
CLIENT_KEY_TAG = "aioproj.clientKey"
#: The tag that makes a run the child of another (a sweep's trials, MLflow's nested runs).
PARENT_RUN_TAG = "mlflow.parentRunId"
USER_TAG = "mlflow.user"
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})

_ADJECTIVES = (
    "amber", "bold", "brisk", "calm", "clever", "crisp", "dapper", "eager", "fleet", "gentle",
    "glad", "keen", "lucid", "merry", "nimble", "proud", "quiet", "rapid", "sly", "sunny",
    "swift", "tidy", "vivid", "witty",
)  # fmt: skip
_ANIMALS = (
    "auk", "bat", "bee", "cat", "crab", "crow", "deer", "doe", "eel", "elk", "finch", "fox",
    "gnu", "hare", "ibis", "jay", "koi", "lark", "lynx", "mole", "moth", "newt", "owl", "ram",
    "seal", "swan", "toad", "wasp", "wren", "yak",
)  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """One run as a store holds it. ``status`` is a name: RUNNING, FINISHED, FAILED, KILLED."""

    run_id: str
    experiment_id: str
    run_name: str
    status: str
    start_time_ms: int
    end_time_ms: int | None
    artifact_uri: str
    tags: Mapping[str, str]
    params: Mapping[str, str]


@runtime_checkable
class TrackingStore(Protocol):
    """The async interface the runner uses to record runs.

    Every method raises :class:`aioproj.errors.TrackingError` when the store cannot record
    or read, and :class:`aioproj.errors.InvalidArgumentError` for bad arguments.
    """

    uri: str

    async def resolve_experiment(
        self, *, experiment_name: str | None, experiment_id: str | None
    ) -> str:
        """Return the experiment id to run in, as MLflow resolves it.

        Both given: InvalidArgumentError. An id must exist. A name is looked up and created
        if missing. Neither: MLFLOW_EXPERIMENT_NAME, then MLFLOW_EXPERIMENT_ID, else "0".
        """
        ...

    async def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str | None,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        start_time_ms: int | None = None,
        client_key: str | None = None,
    ) -> RunRecord:
        """Create a RUNNING run with all its tags and params in one batch.

        ``client_key`` (a 32-digit hex key, the run's journal key) makes the creation
        idempotent: a store that picks run ids itself tags the run with it and, when an
        answer is lost, looks for it before creating again; the file store uses it as the
        run id. :meth:`find_run` finds the run by it later.
        """
        ...

    async def find_run(self, experiment_id: str, client_key: str) -> str | None:
        """The id of the run created with ``client_key`` in the experiment, if any."""
        ...

    async def get_run(self, run_id: str) -> RunRecord:
        """Read a run back; TrackingError if it does not exist."""
        ...

    async def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of a run."""
        ...

    async def set_terminated(
        self, run_id: str, status: str, *, end_time_ms: int | None = None
    ) -> None:
        """Write the final status (FINISHED, FAILED or KILLED) and the end time."""
        ...

    async def log_artifact_bytes(
        self, run_id: str, artifact_path: str, data: bytes, *, append: bool = False
    ) -> None:
        """Write (or append to) the artifact ``artifact_path`` of a run."""
        ...

    async def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """The active runs of ``experiment_id`` whose ``mlflow.parentRunId`` tag is
        ``parent_run_id`` (a sweep's trials), in no particular order."""
        ...

    async def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (the parent run of a resumed sweep); the next
        :meth:`set_terminated` ends it anew."""
        ...

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Metric values logged since each cursor, one list per cursor; advances them.

        One call reads many runs (see :mod:`aioproj.tracking.metrics`).
        """
        ...

    def child_env(self) -> dict[str, str]:
        """Environment variables a child process needs to log into this store."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


def _checked(kind: str, values: Mapping[str, str], limit: int) -> dict[str, str]:
    """Validate keys and values, remove URL credentials from values (``https://user:pw@``)
    and cap them at ``limit`` characters (MLflow truncates too)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        validate_key(kind, key)
        value = redact_credentials(check_text(f"value of {kind} {key!r}", value))
        if len(value) > limit:
            _log.warning("%s %r: value truncated to %d characters", kind, key, limit)
            value = value[:limit]
        out[key] = value
    check_layout(kind, list(out))
    return out


def check_params(params: Mapping[str, str]) -> dict[str, str]:
    """Return ``params`` validated and redacted; InvalidArgumentError for a bad key or
    value."""
    return _checked("param", params, MAX_PARAM_VALUE_LENGTH)


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Return ``tags`` validated and redacted; InvalidArgumentError for a bad key or
    value."""
    return _checked("tag", tags, MAX_TAG_VALUE_LENGTH)


@functools.cache
def current_user() -> str:
    """The ``mlflow.user`` tag: the login name, looked up once per process."""
    import getpass  # with pwd and termios, on first use rather than on import

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def generate_run_name() -> str:
    """A short random run name such as ``brisk-owl-407``."""
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}-{random.randint(0, 999)}"


#: The experiment every MLflow store has, used when nothing names another.
DEFAULT_EXPERIMENT_ID = "0"


async def choose_experiment(
    *,
    experiment_name: str | None,
    experiment_id: str | None,
    by_id: Callable[[str], Awaitable[str]],
    by_name: Callable[[str], Awaitable[str]],
) -> str:
    """MLflow's rules for the experiment of a run, for any store.

    An id is checked with ``by_id``; a name is found or created with ``by_name``; with
    neither, MLFLOW_EXPERIMENT_NAME, then MLFLOW_EXPERIMENT_ID, then the Default
    experiment "0".

    Raises:
        InvalidArgumentError: both arguments given, or MLFLOW_EXPERIMENT_ID disagreeing
            with MLFLOW_EXPERIMENT_NAME; and whatever ``by_id`` / ``by_name`` raise.
    """
    if experiment_name is not None and experiment_id is not None:
        raise InvalidArgumentError("Specify only one of 'experiment_name' or 'experiment_id'.")
    if experiment_id is not None:
        return await by_id(str(experiment_id))
    if experiment_name is not None:
        check_text("experiment name", experiment_name, limit=MAX_EXPERIMENT_NAME_LENGTH)
        return await by_name(experiment_name)
    env_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or None
    if env_name is not None:
        check_text(
            "experiment name (MLFLOW_EXPERIMENT_NAME)", env_name, limit=MAX_EXPERIMENT_NAME_LENGTH
        )
        found = await by_name(env_name)
        if env_id is not None and env_id != found:
            raise InvalidArgumentError(
                f"MLFLOW_EXPERIMENT_ID={env_id!r} does not match the id {found!r} of"
                f" MLFLOW_EXPERIMENT_NAME={env_name!r}."
            )
        return found
    return await by_id(env_id or DEFAULT_EXPERIMENT_ID)


def named_run_tags(tags: Mapping[str, str], run_name: str | None) -> tuple[dict[str, str], str]:
    """Checked tags with ``mlflow.runName`` set, and the run's name, as every store needs.

    The name is ``run_name``, else the ``mlflow.runName`` tag, else a generated one.

    Raises:
        InvalidArgumentError: a bad tag key or value, a run name :func:`check_text`
            refuses, or ``run_name`` disagreeing with an ``mlflow.runName`` tag.
    """
    if run_name:
        run_name = redact_credentials(check_text("run name", run_name))
    all_tags = check_tags(tags)
    tag_name = all_tags.get(RUN_NAME_TAG)
    if run_name and tag_name and run_name != tag_name:
        raise InvalidArgumentError(
            f"run_name={run_name!r} and the tag {RUN_NAME_TAG}={tag_name!r} disagree."
        )
    name = check_text(
        "run name", run_name or tag_name or generate_run_name(), limit=MAX_RUN_NAME_LENGTH
    )
    all_tags[RUN_NAME_TAG] = name
    return all_tags, name
