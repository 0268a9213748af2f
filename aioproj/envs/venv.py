"""The ``virtualenv`` and ``uv`` environment managers.

``virtualenv``: ``<python> -m venv <dir>``, then ``<dir>/bin/python -m pip install -r``
for the build dependencies and then the dependencies. ``uv``: ``uv venv --python
<python> <dir>``, then ``uv pip install --python <dir>/bin/python -r`` likewise. The
requirement lines are written, with relative paths made absolute, to a requirements file
inside the environment, and pip runs in the project directory (as MLflow does).

Environments are cached by spec hash (:mod:`aioproj.envs.cache`): N concurrent
preparations of one spec build once, and later runs reuse the directory at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from aioproj.errors import EnvironmentBuildError
from aioproj.project import Project

from .base import PYTHON_MANAGERS, PreparedEnv
from .cache import ensure_env_dir, env_dir_for
from .interpreters import Interpreter, find_interpreter, parse_version_request
from .pyspec import PythonSpec, load_python_spec, requirement_lines, spec_digest
from .steps import run_step

__all__ = ["PYTHON_MANAGERS", "find_uv", "prepare_python_env"]

logger = logging.getLogger("aioproj.envs")


OutputCallback = Callable[[bytes], None]

_PIP_ENV = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
_UV_MISSING = (
    "The 'uv' environment manager needs the uv executable, which was not found on PATH. "
    "Install it with `pip install uv` (or see https://docs.astral.sh/uv/), or use "
    "env_manager='virtualenv'."
)


async def prepare_python_env(
    project: Project,
    manager: str,
    *,
    cache_dir: Path,
    on_output: OutputCallback | None = None,
) -> PreparedEnv:
    """The cached ``virtualenv`` or ``uv`` environment for ``project``, built if needed.

    Build output goes to ``on_output`` (if given) as it comes. Raises
    :class:`EnvironmentBuildError` for a bad spec, a missing interpreter or uv, or a
    failed build (with the failing command and the tail of its output); nothing is left
    behind. Cancellation stops the build's processes and removes the partial directory.
    """
    if manager not in PYTHON_MANAGERS:
        raise ValueError(f"not a Python environment manager: {manager!r}")
    spec = await anyio.to_thread.run_sync(load_python_spec, project)
    parse_version_request(spec.python)  # a bad version fails before anything is built
    digest = await anyio.to_thread.run_sync(spec_digest, spec, manager)
    directory = env_dir_for(cache_dir, manager, digest)

    async def build(target: Path) -> Mapping[str, object]:
        return await _build(manager, spec, target, on_output)

    result = await ensure_env_dir(directory, build)
    if not result.built:
        logger.debug("Reusing %s environment %s", manager, directory)
    return python_prepared_env(manager, result.directory)


def python_prepared_env(manager: str, directory: Path) -> PreparedEnv:
    """How a run enters the environment in ``directory``: ``source bin/activate``, and
    ``VIRTUAL_ENV``/``PATH`` for callers that do not go through a shell."""
    bindir = directory / "bin"
    path = os.environ.get("PATH", "")
    return PreparedEnv(
        manager=manager,
        tag=manager,
        activate=f"source {shlex.quote(str(bindir / 'activate'))}",
        env_vars={"VIRTUAL_ENV": str(directory), "PATH": f"{bindir}{os.pathsep}{path}"},
        directory=directory,
    )


async def find_uv() -> Path:
    """The uv executable: on PATH, else from the ``uv`` Python package if installed.

    Raises :class:`EnvironmentBuildError` saying to ``pip install uv``.
    """
    found = await anyio.to_thread.run_sync(_which_uv)
    if found is None:
        raise EnvironmentBuildError(_UV_MISSING)
    return found


def _which_uv() -> Path | None:
    exe = shutil.which("uv")
    if exe is not None:
        return Path(exe)
    try:
        module = importlib.import_module("uv")
        candidate = Path(module.find_uv_bin())
    except (ImportError, AttributeError, OSError):
        return None
    return candidate if candidate.is_file() else None


async def _build(
    manager: str, spec: PythonSpec, target: Path, on_output: OutputCallback | None
) -> Mapping[str, object]:
    logger.info("Building %s environment in %s (%s)", manager, target, spec.source)
    if manager == "uv":
        return await _build_uv(spec, target, on_output)
    return await _build_virtualenv(spec, target, on_output)


async def _build_virtualenv(
    spec: PythonSpec, target: Path, on_output: OutputCallback | None
) -> Mapping[str, object]:
    interpreter = await find_interpreter(spec.python, uv=await _optional_uv())
    env = _build_env()
    await run_step(
        [interpreter.path, "-m", "venv", target],
        what=f"Creating a virtualenv with {interpreter.path} (Python {interpreter.version_string})",
        hint="Check that this Python has the venv module (Debian: apt install python3-venv).",
        cwd=spec.base_dir,
        env=env,
        on_output=on_output,
    )
    python = target / "bin" / "python"
    for group, lines in _groups(spec):
        requirements = await _write_requirements(target, group, lines, spec.base_dir)
        await run_step(
            [python, "-m", "pip", "install", "-r", requirements],
            what=f"Installing the {group.replace('_', ' ')} of {spec.source} with pip",
            hint=_install_hint(spec),
            cwd=spec.base_dir,
            env=env,
            on_output=on_output,
        )
    return _info("virtualenv", spec, interpreter.path, interpreter.version_string)


async def _build_uv(
    spec: PythonSpec, target: Path, on_output: OutputCallback | None
) -> Mapping[str, object]:
    uv = await find_uv()
    python_arg, python_version = await _uv_python(spec, uv)
    env = _build_env()
    await run_step(
        [uv, "venv", "--python", python_arg, target],
        what=f"Creating a uv environment with Python {python_arg}",
        hint=(
            f"Install Python {spec.python} with `uv python install {spec.python}` or "
            f"`pyenv install {spec.python}`."
        ),
        cwd=target.parent,
        env=env,
        on_output=on_output,
    )
    python = target / "bin" / "python"
    for group, lines in _groups(spec):
        requirements = await _write_requirements(target, group, lines, spec.base_dir)
        await run_step(
            [uv, "pip", "install", "--python", python, "-r", requirements],
            what=f"Installing the {group.replace('_', ' ')} of {spec.source} with uv",
            hint=_install_hint(spec),
            cwd=spec.base_dir,
            env=env,
            on_output=on_output,
        )
    return _info("uv", spec, python_arg, python_version)


async def _uv_python(spec: PythonSpec, uv: Path) -> tuple[str, str | None]:
    """An installed interpreter's path for ``uv venv``; else the version itself, which
    lets uv use (or, if its settings allow, download) a Python it manages."""
    try:
        interpreter: Interpreter = await find_interpreter(spec.python, uv=uv)
    except EnvironmentBuildError:
        return spec.python, None
    return str(interpreter.path), interpreter.version_string


async def _optional_uv() -> Path | None:
    return await anyio.to_thread.run_sync(_which_uv)


def _groups(spec: PythonSpec) -> list[tuple[str, tuple[str, ...]]]:
    groups = [("build_dependencies", spec.build_dependencies), ("dependencies", spec.dependencies)]
    return [(name, lines) for name, lines in groups if lines]


async def _write_requirements(target: Path, group: str, lines: tuple[str, ...], base: Path) -> Path:
    path = target / f"aioproj-{group}.txt"
    text = "".join(f"{line}\n" for line in requirement_lines(lines, base))
    await anyio.Path(path).write_text(text, encoding="utf-8")
    return path


def _build_env() -> dict[str, str]:
    env = {**os.environ, **_PIP_ENV}
    # The build must not install into whatever environment aioproj itself runs in.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    return env


def _install_hint(spec: PythonSpec) -> str:
    return (
        f"Check the dependencies in {spec.source}; relative paths are resolved against "
        f"the project directory {spec.base_dir}."
    )


def _info(
    manager: str, spec: PythonSpec, python: str | Path, version: str | None
) -> dict[str, object]:
    return {
        "manager": manager,
        "python_requested": spec.python,
        "python": str(python),
        "python_version": version,
        "source": spec.source,
        "build_dependencies": list(spec.build_dependencies),
        "dependencies": list(spec.dependencies),
    }
