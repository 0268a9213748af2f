"""Environments: prepare what a project's entry point runs in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import EnvironmentBuildError
from ..project import Project
from .base import ENV_MANAGERS, PreparedEnv
from .select import select_env_manager, validate_env_manager

__all__ = [
    "ENV_MANAGERS",
    "PreparedEnv",
    "local_env",
    "prepare_env",
    "select_env_manager",
    "validate_env_manager",
]


def local_env() -> PreparedEnv:
    """The current environment: the command runs with this Python's ``bin`` first on PATH,
    so ``python`` in an entry point is the interpreter aioproj runs in (as a user of a
    virtualenv expects), even when that environment is not activated."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    return PreparedEnv(manager="local", env_vars={"PATH": f"{bindir}{os.pathsep}{path}"})


async def prepare_env(project: Project, manager: str, *, cache_dir: Path) -> PreparedEnv:
    """Prepare the environment ``manager`` builds for ``project`` (cached by spec).

    Raises :class:`EnvironmentBuildError` if it cannot be built; a failed build leaves
    nothing behind. Cancellation removes a half-built environment.
    """
    if manager == "local":
        return local_env()
    raise EnvironmentBuildError(
        f"The {manager!r} environment manager is not available in this version of aioproj. "
        f"Run the project in the current environment with env_manager='local' "
        f"(CLI: --env-manager local)."
    )
