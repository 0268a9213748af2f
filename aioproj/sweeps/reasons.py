"""Why a trial failed, in words fit for a screen and a tag: the error aioproj raised, or
the last lines of the run's output; with the secrets aioproj knows of replaced by ``***``.

A project that fails often prints its environment or a URL with credentials in a
traceback, and a sweep shows these lines on screen and records them in the trial's
``aioproj.sweep.reason`` tag. :class:`Redactor` removes, through the project's one
redaction path (:mod:`aioproj._redact`), what it can know to be secret: the credentials
of every URL in the text (and those of the project and tracking URIs wherever they
appear), the values of environment variables whose names say they are secrets
(``*TOKEN*``, ``*PASSWORD*``, ``*SECRET*``, ``*KEY*``...) and the ``docker_auth`` values.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable, Mapping

import anyio
import anyio.lowlevel

from aioproj._redact import redact, redact_text
from aioproj.handle import SubmittedRun

__all__ = ["TAIL_LINES", "Redactor", "error_text", "output_tail"]

#: Lines of a failed run's output that make its reason.
TAIL_LINES = 10

_SECRET_NAME = re.compile(
    r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_?KEY|PRIVATE_KEY|ACCESS_KEY|AUTH", re.I
)
#: Shorter values would blank out ordinary words.
_MIN_SECRET = 4


class Redactor:
    """Removes URL credentials and the secrets it was given from text, through the
    project's one redaction path (:func:`aioproj._redact.redact`)."""

    def __init__(self, urls: Iterable[str], secrets: Iterable[str]) -> None:
        self._urls = [u for u in dict.fromkeys(urls) if u]
        self._secrets = [s for s in dict.fromkeys(secrets) if len(s) >= _MIN_SECRET]

    @classmethod
    def for_sweep(
        cls,
        *,
        uri: str,
        child_env: Mapping[str, str],
        docker_auth: Mapping[str, str] | None,
        environ: Mapping[str, str] | None = None,
    ) -> Redactor:
        """The redactor for a sweep's trials: those of ``uri`` (the project), the
        tracking store's ``child_env``, the environment and ``docker_auth``."""
        env = {**(os.environ if environ is None else environ), **child_env}
        urls = [uri, env.get("MLFLOW_TRACKING_URI", "")]
        secrets = [v for k, v in env.items() if _SECRET_NAME.search(k)]
        secrets += [v for k, v in (docker_auth or {}).items() if k != "username"]
        return cls(urls, secrets)

    def __call__(self, text: str) -> str:
        for url in self._urls:  # also a password quoted alone, percent-decoded
            text = redact_text(text, url)
        return redact(text, self._secrets)


def error_text(exc: BaseException) -> str:
    """An error as one line: its type and message."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def output_tail(run: SubmittedRun, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-blank lines of an ended run's output.

    Reads the output kept in memory, from the start (a few seconds at most for the
    largest kept log), yielding to the event loop as it goes.
    """
    tail: collections.deque[str] = collections.deque(maxlen=lines)
    with anyio.move_on_after(10):
        count = 0
        async for line in run.logs():
            if line.strip():
                tail.append(line.rstrip())
            count += 1
            if count % 2000 == 0:
                await anyio.lowlevel.checkpoint()
    return list(tail)
