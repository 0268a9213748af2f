"""aioproj: run MLflow Projects from asyncio.

``await aioproj.run(uri, ...)`` takes the arguments of ``mlflow.projects.run`` and returns
an awaitable :class:`SubmittedRun`; many runs share one event loop.
"""

from __future__ import annotations

from .errors import (
    AioprojError,
    BackendError,
    EntryPointError,
    EnvironmentBuildError,
    ExecutionError,
    InvalidArgumentError,
    MLprojectError,
    ParameterError,
    RunFailedError,
    SourceError,
    TrackingError,
)
from .handle import RunStatus, SubmittedRun
from .runner import Runner, run

__version__ = "0.1.0"

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
    "RunStatus",
    "Runner",
    "SourceError",
    "SubmittedRun",
    "TrackingError",
    "run",
]

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__"):
        _obj.__module__ = "aioproj"
del _name, _obj
