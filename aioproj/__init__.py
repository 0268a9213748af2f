"""aioproj: run MLflow Projects from asyncio.

``await aioproj.run(uri, ...)`` takes the arguments of ``mlflow.projects.run`` and returns
an awaitable :class:`SubmittedRun`; many runs share one event loop. ``aioproj.sweep(uri,
grid, ...)`` runs one project with many parameter sets and yields results as they end.
"""

from __future__ import annotations

import typing as _typing

from ._redact import install_log_redaction as _install_log_redaction
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

if _typing.TYPE_CHECKING:
    from .journal import recover
    from .runner import Runner, run
    from .sweeps import (
        ASHA,
        Choice,
        IntUniform,
        LogUniform,
        MedianStopping,
        OptunaTuner,
        Stopper,
        Sweep,
        TrialResult,
        Tuner,
        Uniform,
        sweep,
    )
    from .tracking.metrics import Metric

_install_log_redaction()

__version__ = "0.1.0"

__all__ = [
    "ASHA",
    "AioprojError",
    "BackendError",
    "Choice",
    "EntryPointError",
    "EnvironmentBuildError",
    "ExecutionError",
    "IntUniform",
    "InvalidArgumentError",
    "LogUniform",
    "MLprojectError",
    "MedianStopping",
    "Metric",
    "OptunaTuner",
    "ParameterError",
    "RunFailedError",
    "RunStatus",
    "Runner",
    "SourceError",
    "Stopper",
    "SubmittedRun",
    "Sweep",
    "TrackingError",
    "TrialResult",
    "Tuner",
    "Uniform",
    "recover",
    "run",
    "sweep",
]

#: Names whose modules load on first use: the runner pulls in the project parser, the
#: sources, the environments and the tracking store, which a program that only imports
#: aioproj (or its CLI's --help) does not need.
_LAZY = {
    "ASHA": "sweeps",
    "Choice": "sweeps",
    "IntUniform": "sweeps",
    "LogUniform": "sweeps",
    "MedianStopping": "sweeps",
    "Metric": "tracking.metrics",
    "OptunaTuner": "sweeps",
    "Runner": "runner",
    "Stopper": "sweeps",
    "Sweep": "sweeps",
    "TrialResult": "sweeps",
    "Tuner": "sweeps",
    "Uniform": "sweeps",
    "recover": "journal",
    "run": "runner",
    "sweep": "sweeps",
}


def __getattr__(name: str) -> _typing.Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'aioproj' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"aioproj.{_LAZY[name]}"), name)
    value.__module__ = "aioproj"
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


for _name in __all__:
    if _name not in _LAZY:
        globals()[_name].__module__ = "aioproj"
del _name
