"""The project spec: MLproject parsing, parameter validation and command rendering.

Pure logic: the only I/O is :func:`load_project` reading the MLproject file and checking
that the env files it names exist.
"""

from __future__ import annotations

from aioproj.project.parameters import ResolvedParameters, resolve_parameters
from aioproj.project.spec import (
    DockerEnv,
    EntryPoint,
    EnvType,
    Parameter,
    Project,
    load_project,
    parse_project,
)

__all__ = [
    "DockerEnv",
    "EntryPoint",
    "EnvType",
    "Parameter",
    "Project",
    "ResolvedParameters",
    "load_project",
    "parse_project",
    "resolve_parameters",
]
