"""What a prepared environment gives a run (a command prefix, variables and a tag), the
names of the env managers, and where virtualenv and uv environments live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aioproj.backends.base import Launch

__all__ = ["ENV_MANAGERS", "ENV_ROOT_VAR", "PYTHON_MANAGERS", "PreparedEnv", "env_root"]

#: The env managers ``run(env_manager=...)`` accepts, as MLflow names them.
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")


@dataclass(frozen=True)
class PreparedEnv:
    """An environment ready for runs: how to enter it, and how tracking names it."""

    manager: str
    #: The ``mlflow.project.env`` tag, or None (the ``local`` manager sets no tag).
    tag: str | None = None
    #: A shell command that enters the environment, run before the entry point with ``&&``.
    activate: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    #: The environment's directory (virtualenv, uv), or None.
    directory: Path | None = None
    #: Tags the run gets besides ``mlflow.project.env`` (docker: the image uri and id).
    tags: Mapping[str, str] = field(default_factory=dict)

    def wrap(self, command: str) -> str:
        """The entry-point command as it runs inside this environment."""
        if self.activate is None:
            return command
        return f"{self.activate} && {command}"

    def wrap_launch(self, launch: Launch) -> Launch:
        """The launch a local backend hands the runner for a run in this environment:
        ``launch`` itself, or one that also manages what the environment starts besides
        the process (docker: the run's container)."""
        return launch


#: MLflow's variable for where its virtualenv environments live; aioproj's virtualenv and
#: uv environments go there too when it is set.
ENV_ROOT_VAR = "MLFLOW_ENV_ROOT"


def env_root(default: Path) -> Path:
    """Where virtualenv and uv environments live: ``$MLFLOW_ENV_ROOT`` when it is set and
    not empty (as MLflow's), else ``default`` (``<AIOPROJ_CACHE_DIR or ~/.cache/aioproj>/envs``
    for a :class:`~aioproj.Runner`). aioproj's directories are named
    ``virtualenv-<hash>`` / ``uv-<hash>``, so they never collide with MLflow's."""
    explicit = os.environ.get(ENV_ROOT_VAR, "").strip()
    return Path(explicit).expanduser() if explicit else default


#: The managers :mod:`aioproj.envs.venv` builds.
PYTHON_MANAGERS = ("virtualenv", "uv")
