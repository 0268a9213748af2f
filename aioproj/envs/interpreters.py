"""Find an installed Python interpreter for a requested version, without downloading.

A request such as ``"3.11"`` is satisfied by any installed 3.11.x; ``"3.11.7"`` needs
exactly that release. Candidates are, in order: the running interpreter, ``python3.X``,
``python3`` and ``python`` on PATH, pyenv's versions directory (``$PYENV_ROOT`` or
``~/.pyenv``, newest matching release first) and ``uv python find``. Each candidate
other than the running interpreter is asked for its version by running it (pyenv shims
for versions that are not selected fail there and are skipped).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from aioproj.errors import EnvironmentBuildError

__all__ = [
    "Interpreter",
    "find_interpreter",
    "parse_version_request",
    "version_matches",
]

_VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")
_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
_PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class Interpreter:
    """An installed interpreter and its exact version."""

    path: Path
    version: tuple[int, int, int]

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))


def parse_version_request(requested: str) -> tuple[int, ...]:
    """``(3, 11)`` from ``"3.11"``, ``"==3.11"`` or ``"3.11.*"``; ``(3, 11, 7)`` from
    ``"3.11.7"``. Raises :class:`EnvironmentBuildError` for anything else, or for
    Python 2 (environments are created with the ``venv`` module)."""
    text = requested.strip().lstrip("=").strip().removesuffix(".*")
    if not _VERSION_RE.match(text):
        raise EnvironmentBuildError(
            f"Cannot understand the Python version {requested!r}: write a version such as "
            '"3.11" (any 3.11.x) or "3.11.7" (exactly that release).'
        )
    parts = tuple(int(p) for p in text.split("."))
    if parts[0] < 3:
        raise EnvironmentBuildError(
            f"Python {text} is not supported by the virtualenv and uv environment managers "
            "(they need Python 3). Ask for a Python 3 version in python_env.yaml, or run "
            "with env_manager='local'."
        )
    return parts


def version_matches(requested: Sequence[int], actual: Sequence[int]) -> bool:
    """True if ``actual`` (major, minor, micro) is a release of ``requested``."""
    return tuple(actual[: len(requested)]) == tuple(requested)


async def find_interpreter(requested: str, *, uv: Path | None = None) -> Interpreter:
    """The first installed interpreter matching ``requested``.

    ``uv``, when given, is asked too (``uv python find``). Raises
    :class:`EnvironmentBuildError` saying which version is missing and how to install it.
    Cancellation stops any probe process.
    """
    wanted = parse_version_request(requested)
    if version_matches(wanted, sys.version_info[:3]):
        return Interpreter(Path(sys.executable), _current_version())
    candidates = await anyio.to_thread.run_sync(_local_candidates, wanted)
    for path in candidates:
        found = await _probe(path)
        if found is not None and version_matches(wanted, found.version):
            return found
    if uv is not None:
        found = await _find_with_uv(uv, requested.strip())
        if found is not None and version_matches(wanted, found.version):
            return found
    raise _missing(wanted, uv)


def _current_version() -> tuple[int, int, int]:
    major, minor, micro = sys.version_info[:3]
    return (major, minor, micro)


def _local_candidates(wanted: tuple[int, ...]) -> list[Path]:
    """Executables on PATH, then pyenv installs, newest matching release first."""
    names = []
    if len(wanted) >= 2:
        names.append(f"python{wanted[0]}.{wanted[1]}")
    names += [f"python{wanted[0]}", "python"]
    seen: set[Path] = set()
    found: list[Path] = []
    for name in names:
        exe = shutil.which(name)
        if exe is not None and Path(exe) not in seen:
            seen.add(Path(exe))
            found.append(Path(exe))
    found += [p for p in _pyenv_candidates(wanted) if p not in seen]
    return found


def _pyenv_root() -> Path:
    explicit = os.environ.get("PYENV_ROOT")
    return Path(explicit).expanduser() if explicit else Path.home() / ".pyenv"


def _pyenv_candidates(wanted: tuple[int, ...]) -> list[Path]:
    versions = _pyenv_root() / "versions"
    try:
        names = os.listdir(versions)
    except OSError:
        return []
    releases: list[tuple[tuple[int, ...], Path]] = []
    for name in names:
        if not re.fullmatch(r"\d+\.\d+\.\d+", name):
            continue
        version = tuple(int(p) for p in name.split("."))
        exe = versions / name / "bin" / "python"
        if version_matches(wanted, version) and exe.exists():
            releases.append((version, exe))
    return [exe for _, exe in sorted(releases, reverse=True)]


async def _probe(path: Path) -> Interpreter | None:
    """Run ``path`` to learn its version; None if it does not run."""
    output = await _run_quietly([str(path), "-c", _PROBE])
    if output is None:
        return None
    parts = output.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return Interpreter(path, (int(parts[0]), int(parts[1]), int(parts[2])))


async def _find_with_uv(uv: Path, requested: str) -> Interpreter | None:
    output = await _run_quietly([str(uv), "python", "find", requested])
    if output is None or not output.strip():
        return None
    return await _probe(Path(output.strip().splitlines()[-1]))


async def _run_quietly(argv: list[str]) -> str | None:
    """stdout of ``argv`` if it exits 0 within the probe timeout, else None."""
    try:
        with anyio.fail_after(_PROBE_TIMEOUT):
            result = await anyio.run_process(
                argv, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
    except (OSError, TimeoutError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.decode(errors="replace")


def _missing(wanted: tuple[int, ...], uv: Path | None) -> EnvironmentBuildError:
    version = ".".join(map(str, wanted))
    places = "on PATH, in pyenv's versions directory"
    places += " and with `uv python find`" if uv is not None else ""
    return EnvironmentBuildError(
        f"Python {version} is required by the project's environment, but no installed "
        f"interpreter matches it (looked {places}). Install it with `pyenv install {version}` "
        f"or `uv python install {version}`, or run with env_manager='local' to use the "
        "current environment."
    )
