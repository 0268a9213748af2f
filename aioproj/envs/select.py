"""Choose the env manager for a project, as MLflow does. Pure."""

from __future__ import annotations

from aioproj.errors import EnvironmentBuildError, InvalidArgumentError
from aioproj.project import EnvType, Project

from .base import ENV_MANAGERS

__all__ = ["select_env_manager", "validate_env_manager"]

_DEFAULTS = {EnvType.PYTHON: "virtualenv", EnvType.CONDA: "conda", EnvType.DOCKER: "docker"}


def validate_env_manager(env_manager: str | None) -> None:
    """Raise :class:`InvalidArgumentError` unless ``env_manager`` is None or a known name."""
    if env_manager is not None and env_manager not in ENV_MANAGERS:
        raise InvalidArgumentError(
            f"Invalid value for `env_manager`: {env_manager!r}. "
            f"Must be one of {list(ENV_MANAGERS)}."
        )


def select_env_manager(project: Project, env_manager: str | None) -> str:
    """The manager that prepares ``project``: ``docker`` for docker projects, else the
    one asked for, else the project's default (python_env → virtualenv, conda → conda).

    Raises :class:`EnvironmentBuildError` for a python_env project asked to use conda.
    """
    validate_env_manager(env_manager)
    if project.env_type is EnvType.DOCKER:
        return "docker"
    if env_manager is None:
        return _DEFAULTS[project.env_type]
    if env_manager == "conda" and project.env_type is EnvType.PYTHON:
        raise EnvironmentBuildError(
            "python_env project cannot be executed using conda. Set `--env-manager` to "
            "'virtualenv' or 'local' to execute this project."
        )
    return env_manager
