"""The one exception tree of aioproj.

Every error a user can see derives from :class:`AioprojError`. MLflow users who catch
``mlflow.exceptions.ExecutionException`` catch :class:`ExecutionError` here: it is the
base of everything that stops a project from being fetched, validated, prepared or run,
exactly the cases MLflow raises ``ExecutionException`` for.

Messages go through the one redaction path (:mod:`aioproj._redact`): a URL's credentials
never reach an error's text. Native errors (OSError, httpx, dulwich) are translated at
the boundary where they happen, with the context that helps: the URI, the run id, the
file and line.
"""

from __future__ import annotations

from aioproj._redact import redact_credentials

__all__ = [
    "AioprojError",
    "BackendError",
    "EntryPointError",
    "EnvironmentBuildError",
    "ExecutionError",
    "InvalidArgumentError",
    "MLprojectError",
    "ParameterError",
    "RunFailedError",
    "SourceError",
    "TrackingError",
]


class AioprojError(Exception):
    """Base class of every exception raised by aioproj.

    Its message never holds the credentials of a URL: ``https://user:token@host`` in any
    argument is shown as ``https://host`` (see :mod:`aioproj._redact`), whoever raised it
    and whatever value it quotes.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_credentials(a) if isinstance(a, str) else a for a in args))


class InvalidArgumentError(AioprojError, ValueError):
    """An argument of ``run()``, ``Runner()`` or the CLI is not acceptable.

    Examples: an unknown backend or env manager, both ``experiment_name`` and
    ``experiment_id``, a malformed ``backend_config``.
    """


class ExecutionError(AioprojError):
    """A project could not be run. The name and meaning are MLflow's ``ExecutionException``."""


class MLprojectError(ExecutionError):
    """The MLproject file (or a file it names) is malformed.

    ``path`` is the file, ``line`` its 1-based line when known.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


class EntryPointError(ExecutionError):
    """The entry point asked for does not exist and is not a runnable script."""


class ParameterError(ExecutionError):
    """A parameter is missing, unknown to the command, or has a value of the wrong type."""


class SourceError(ExecutionError):
    """A project URI could not be fetched: bad path, unreachable host, bad version, bad archive."""


class EnvironmentBuildError(ExecutionError):
    """The project's environment (virtualenv, uv, conda, docker) could not be prepared."""


class BackendError(ExecutionError):
    """A backend refused or lost a run: the process could not start, the service said no."""


class RunFailedError(ExecutionError):
    """A run ended in FAILED or KILLED while the caller waited for it (``synchronous=True``).

    The message is MLflow's: ``Run (ID '<run_id>') failed``.
    """

    def __init__(self, run_id: str, status: str):
        super().__init__(f"Run (ID '{run_id}') failed")
        self.run_id = run_id
        self.status = status


class TrackingError(AioprojError):
    """The tracking store could not record or read a run."""
