"""Call the mlflow library with its tracking URI set to a runner's store, for one call.

MLflow keeps its tracking URI in one process-wide setting, and some of its code reads
only that (MLflow backend plugins creating their run, ``models:/`` URIs resolved by its
artifact utilities). :func:`call_with_tracking` points it, and the environment variables
a store's child processes get (``MLFLOW_ALLOW_FILE_STORE``...), at the store for the
duration of a blocking call, then puts both back; calls take turns.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

__all__ = ["call_with_tracking"]

T = TypeVar("T")

_LOCK = threading.Lock()


def call_with_tracking(uri: str, env: Mapping[str, str], call: Callable[[], T]) -> T:
    """``call()`` with MLflow tracking to ``uri`` and ``env`` set (blocking; a thread)."""
    with _LOCK, _environment(env), _tracking_uri(uri):
        return call()


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri``, then put back as it was.

    Set directly: ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI, which
    would outlive the call.
    """
    utils = importlib.import_module("mlflow.tracking._tracking_service.utils")
    previous = getattr(utils, "_tracking_uri", None)
    setattr(utils, "_tracking_uri", uri)  # noqa: B010
    try:
        yield
    finally:
        setattr(utils, "_tracking_uri", previous)  # noqa: B010
