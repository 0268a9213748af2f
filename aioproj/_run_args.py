"""The arguments of one run, as :meth:`aioproj.Runner.run` took them (those of
``mlflow.projects.run``): checked once there, then handed whole to the run's phases and to
a detached supervisor's command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aioproj.backends import Backend

__all__ = ["RunArgs"]


@dataclass(frozen=True)
class RunArgs:
    """One :meth:`~aioproj.Runner.run` call's arguments; see it for their meaning."""

    uri: str
    entry_point: str
    version: str | None
    parameters: Mapping[str, Any] | None
    docker_args: Mapping[str, str | bool] | None
    experiment_name: str | None
    experiment_id: str | int | None
    backend: str | Backend
    backend_config: Mapping[str, Any] | str | None
    storage_dir: str | Path | None
    synchronous: bool
    run_id: str | None
    run_name: str | None
    env_manager: str | None
    build_image: bool
    docker_auth: Mapping[str, str] | None
