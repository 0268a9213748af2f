"""Environments: prepare what a project's entry point runs in."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from aioproj.errors import EnvironmentBuildError
from aioproj.project import Project

from .base import ENV_MANAGERS, PYTHON_MANAGERS, PreparedEnv, env_root
from .select import select_env_manager, validate_env_manager

__all__ = [
    "ENV_MANAGERS",
    "PreparedEnv",
    "env_root",
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


async def prepare_env(
    project: Project,
    manager: str,
    *,
    cache_dir: Path,
    on_output: Callable[[bytes], None] | None = None,
    project_dir: Path | None = None,
    docker_args: Mapping[str, str | bool] | None = None,
    build_image: bool = False,
    docker_auth: Mapping[str, str] | None = None,
    tracking_uri: str = "",
    git_commit: str | None = None,
) -> PreparedEnv:
    """Prepare the environment ``manager`` builds for ``project`` (cached by spec).

    ``local`` creates nothing. ``virtualenv`` and ``uv`` build (once, shared by
    concurrent callers and other processes) an environment under ``$MLFLOW_ENV_ROOT`` if
    set, else ``cache_dir`` (see :func:`env_root`), keyed by the hash of the spec, and
    reuse it afterwards; build output is passed to ``on_output`` as it comes.
    ``docker`` (docker_env projects) checks docker, pulls or (``build_image``) builds the
    image in ``project_dir`` (default: the project's directory; ``git_commit`` tags a
    built image) and returns the ``docker run`` wrapper;
    ``docker_args``, ``docker_auth`` and ``tracking_uri`` are used only by it (see
    :mod:`aioproj.envs.docker`).

    Raises :class:`EnvironmentBuildError` if it cannot be built; a failed build leaves
    nothing behind. Cancellation stops the build's processes and removes a half-built
    environment before it propagates.
    """
    if manager == "local":
        return local_env()
    if manager in PYTHON_MANAGERS:
        from .venv import prepare_python_env  # imported only by runs that build one

        return await prepare_python_env(
            project, manager, cache_dir=env_root(cache_dir), on_output=on_output
        )
    if manager == "conda":
        from .conda import prepare_conda_env

        return await prepare_conda_env(project, cache_dir=cache_dir, on_output=on_output)
    if manager == "docker":
        from .docker import prepare_docker_env

        return await prepare_docker_env(
            project,
            project_dir=project_dir,
            docker_args=docker_args,
            build_image=build_image,
            docker_auth=docker_auth,
            tracking_uri=tracking_uri,
            git_commit=git_commit,
            on_output=on_output,
        )
    raise EnvironmentBuildError(
        f"The {manager!r} environment manager is not available in this version of aioproj. "
        f"Run the project with env_manager='local' (the current environment) or "
        f"'virtualenv' (CLI: --env-manager local|virtualenv)."
    )
