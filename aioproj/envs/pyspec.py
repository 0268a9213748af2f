"""What a virtualenv or uv environment holds: the Python version and pip requirements.

A :class:`PythonSpec` comes from a project's ``python_env.yaml``, from its ``conda.yaml``
(keeping the Python version and the ``pip:`` dependencies), or, with no environment
file, from the running interpreter (its version, no dependencies).

:func:`spec_digest` hashes a canonical form of the spec, including the contents of the
requirement files it references (``-r``/``-c``, recursively), so editing
``requirements.txt`` gives a new environment. Local path dependencies (``./pkg``, wheels)
are keyed by their absolute location, not their contents.

Parsing is pure; the ``load_*`` functions and :func:`spec_digest` read files and are
meant for a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from aioproj._redact import warn
from aioproj.errors import EnvironmentBuildError
from aioproj.project import EnvType, Project

__all__ = [
    "PythonSpec",
    "RequirementLine",
    "current_python_version",
    "load_python_spec",
    "parse_conda_env",
    "parse_python_env",
    "parse_requirement_line",
    "spec_digest",
]

#: Bumped when the canonical form changes, so old cache entries are not reused wrongly.
_DIGEST_FORMAT = 1

#: Conda packages that are pip's own tooling: kept as build dependencies.
_CONDA_BUILD_PACKAGES = frozenset({"pip", "setuptools", "wheel"})

_OPTION_RE = re.compile(
    r"^(?P<opt>--requirement|--constraint|--editable|-r|-c|-e)(?:\s*=\s*|\s*)(?P<value>\S.*)$"
)
_FILE_OPTIONS = frozenset({"-r", "--requirement", "-c", "--constraint"})
_CONDA_DEP_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<spec>.*)$")
_PATH_PREFIXES = ("./", "../", "/", "~/")
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True)
class PythonSpec:
    """A Python environment to build.

    ``python`` is the requested version as written (``"3.11"`` or ``"3.11.7"``);
    requirement lines are pip requirement-file lines as written; ``base_dir`` is the
    directory relative paths in them are resolved against (the project directory);
    ``source`` names where the spec came from, for error messages.
    """

    python: str
    base_dir: Path
    source: str
    build_dependencies: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequirementLine:
    """A requirement line made independent of the working directory.

    ``text`` is the line for pip with relative paths made absolute; ``files`` are the
    requirement/constraint files it includes, ``paths`` the local packages it installs.
    """

    text: str
    files: tuple[Path, ...] = ()
    paths: tuple[Path, ...] = ()


def current_python_version() -> str:
    """The running interpreter's version, ``major.minor.micro``."""
    return platform.python_version()


def parse_python_env(text: str, *, path: Path, base_dir: Path) -> PythonSpec:
    """Parse ``python_env.yaml`` text (keys ``python``, ``build_dependencies``,
    ``dependencies``). Raises :class:`EnvironmentBuildError` naming ``path`` if the
    YAML or a value is malformed."""
    data = _load_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EnvironmentBuildError(f"{path}: expected a mapping, got {_kind(data)}.")
    unknown = sorted(set(map(str, data)) - {"python", "build_dependencies", "dependencies"})
    if unknown:
        raise EnvironmentBuildError(
            f"{path}: unknown key(s) {', '.join(unknown)}; "
            "expected python, build_dependencies, dependencies."
        )
    return PythonSpec(
        python=_python_version_value(data.get("python"), path),
        base_dir=base_dir,
        source=str(path),
        build_dependencies=_string_list(data.get("build_dependencies"), "build_dependencies", path),
        dependencies=_string_list(data.get("dependencies"), "dependencies", path),
    )


def parse_conda_env(text: str, *, path: Path, base_dir: Path) -> tuple[PythonSpec, list[str]]:
    """Parse ``conda.yaml`` text for a virtualenv: the ``python`` pin, pip/setuptools/wheel
    as build dependencies and the ``pip:`` list as dependencies.

    Returns the spec and the conda-only dependencies that were dropped. Raises
    :class:`EnvironmentBuildError` naming ``path`` if the file is malformed.
    """
    data = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise EnvironmentBuildError(f"{path}: expected a mapping, got {_kind(data)}.")
    deps = data.get("dependencies") or []
    if not isinstance(deps, list):
        raise EnvironmentBuildError(f"{path}: 'dependencies' must be a list, got {_kind(deps)}.")
    python: str | None = None
    build: list[str] = []
    pip_deps: list[str] = []
    dropped: list[str] = []
    for item in deps:
        if isinstance(item, dict) and set(item) == {"pip"}:
            pip_deps.extend(_string_list(item["pip"], "dependencies.pip", path))
        elif isinstance(item, str):
            python, kept = _classify_conda_dep(item, python, path)
            if kept is not None:
                build.append(kept)
            elif not _is_python_dep(item):
                dropped.append(item)
        else:
            raise EnvironmentBuildError(
                f"{path}: each item of 'dependencies' must be a string or a 'pip:' list, "
                f"got {item!r}."
            )
    spec = PythonSpec(
        python=python or current_python_version(),
        base_dir=base_dir,
        source=str(path),
        build_dependencies=tuple(build),
        dependencies=tuple(pip_deps),
    )
    return spec, dropped


def load_python_spec(project: Project) -> PythonSpec:
    """The spec for ``project`` (reads its env file; call from a worker thread).

    Warns (UserWarning) when conda-only dependencies of a ``conda.yaml`` are dropped.
    Raises :class:`EnvironmentBuildError` for an unreadable or malformed file, or for a
    docker project (which has no Python spec).
    """
    base_dir = project.directory
    path = project.env_config_path
    if project.env_type is EnvType.DOCKER:
        raise EnvironmentBuildError("A docker_env project has no Python environment to build.")
    if path is None:
        return PythonSpec(
            python=current_python_version(),
            base_dir=base_dir,
            source="no environment file (current Python version, no dependencies)",
        )
    text = _read_text(path)
    if project.env_type is EnvType.CONDA:
        spec, dropped = parse_conda_env(text, path=path, base_dir=base_dir)
        if dropped:
            warn(
                f"{path}: conda-only dependencies are not installed in a virtualenv and are "
                f"dropped: {', '.join(dropped)}. Use env_manager='conda' to install them, or "
                "list pip equivalents under 'pip:'.",
                UserWarning,
                stacklevel=2,
            )
        return spec
    return parse_python_env(text, path=path, base_dir=base_dir)


def parse_requirement_line(line: str, base_dir: Path) -> RequirementLine:
    """Make one requirement line independent of the working directory: ``-r``/``-c``
    files, ``-e`` paths and local package paths are resolved against ``base_dir``."""
    text = line.strip()
    match = _OPTION_RE.match(text)
    if match:
        opt, value = match["opt"], _unquote(match["value"].strip())
        if opt in _FILE_OPTIONS:
            file = _resolve(value, base_dir)
            return RequirementLine(f"{opt} {file}", files=(file,))
        if _looks_like_path(value):
            local = _resolve(value, base_dir)
            return RequirementLine(f"{opt} {local}", paths=(local,))
        return RequirementLine(text)
    if _looks_like_path(text):
        local = _resolve(text, base_dir)
        return RequirementLine(str(local), paths=(local,))
    return RequirementLine(text)


def spec_digest(spec: PythonSpec, manager: str) -> str:
    """The sha256 (hex) of ``spec``'s canonical form for ``manager``: Python version,
    requirement lines, contents of referenced requirement files and local paths.

    Reads files (call from a worker thread). Raises :class:`EnvironmentBuildError` if a
    referenced requirement file cannot be read.
    """
    canonical = json.dumps(_canonical(spec, manager), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(spec: PythonSpec, manager: str) -> dict[str, object]:
    files: dict[str, str] = {}
    paths: set[str] = set()
    groups: dict[str, list[str]] = {}
    for name, lines in (
        ("build_dependencies", spec.build_dependencies),
        ("dependencies", spec.dependencies),
    ):
        groups[name] = [line.strip() for line in lines]
        for line in lines:
            resolved = parse_requirement_line(line, spec.base_dir)
            paths.update(str(p) for p in resolved.paths)
            for file in resolved.files:
                _digest_requirement_file(file, spec, files, paths)
    return {
        "format": _DIGEST_FORMAT,
        "manager": manager,
        "python": spec.python.strip(),
        **groups,
        "files": files,
        "paths": sorted(paths),
    }


def _digest_requirement_file(
    file: Path, spec: PythonSpec, files: dict[str, str], paths: set[str]
) -> None:
    """Record ``file``'s sha256 and, recursively, those of the files it includes."""
    key = str(file)
    if key in files:
        return
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise EnvironmentBuildError(
            f"{spec.source} refers to the requirements file {file}, which cannot be read: "
            f"{exc.strerror or exc}. Paths are relative to the project directory "
            f"{spec.base_dir}."
        ) from exc
    files[key] = hashlib.sha256(data).hexdigest()
    for line in _requirement_file_lines(data.decode("utf-8", errors="replace")):
        nested = parse_requirement_line(line, file.parent)
        for inner in nested.files:
            _digest_requirement_file(inner, spec, files, paths)
        # pip resolves bare paths in requirement files against the working directory,
        # which is the project directory during installs.
        paths.update(str(p) for p in parse_requirement_line(line, spec.base_dir).paths)


def _requirement_file_lines(text: str) -> Iterable[str]:
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _classify_conda_dep(item: str, python: str | None, path: Path) -> tuple[str | None, str | None]:
    """(python version so far, kept build dependency or None) for one conda dependency."""
    match = _CONDA_DEP_RE.match(item.strip())
    if match is None:
        return python, None
    name, version_spec = match["name"].lower(), match["spec"].strip()
    if name == "python":
        return _conda_python_version(version_spec, path) or python, None
    if name in _CONDA_BUILD_PACKAGES:
        return python, _conda_to_pip(name, version_spec)
    return python, None


def _is_python_dep(item: str) -> bool:
    match = _CONDA_DEP_RE.match(item.strip())
    return match is not None and match["name"].lower() == "python"


def _conda_python_version(version_spec: str, path: Path) -> str | None:
    """``3.10`` from ``=3.10``, ``==3.10.4``, ``>=3.8``, ``=3.10.*``; None when unpinned."""
    if not version_spec:
        return None
    version = version_spec.lstrip("=<>! ").removesuffix(".*").removesuffix("*").strip()
    if not re.fullmatch(r"\d+(\.\d+){0,2}", version):
        raise EnvironmentBuildError(
            f"{path}: cannot read a Python version from 'python{version_spec}'; "
            "pin it like 'python=3.11'."
        )
    return version


def _conda_to_pip(name: str, version_spec: str) -> str:
    """A conda match spec as a pip requirement: ``pip=23.1`` → ``pip==23.1.*``."""
    if not version_spec:
        return name
    if version_spec.startswith("=") and not version_spec.startswith("=="):
        version = version_spec[1:].strip().removesuffix(".*").removesuffix("*")
        return f"{name}=={version}.*"
    return f"{name}{version_spec}"


def _python_version_value(value: object, path: Path) -> str:
    if value is None:
        return current_python_version()
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EnvironmentBuildError(f"{path}: 'python' must be a version string like \"3.11\".")
    if isinstance(value, float) and str(value) in {"3.1", "3.2"}:
        raise EnvironmentBuildError(
            f"{path}: 'python: {value}' is read by YAML as the number {value}; "
            f'quote the version, for example python: "{value}0".'
        )
    return str(value).strip()


def _string_list(value: object, key: str, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EnvironmentBuildError(f"{path}: '{key}' must be a list of strings.")
    return tuple(v.strip() for v in value if v.strip())


def _load_yaml(text: str, path: Path) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EnvironmentBuildError(f"{path}: invalid YAML: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvironmentBuildError(
            f"Cannot read environment file {path}: {exc.strerror or exc}"
        ) from exc


def _looks_like_path(value: str) -> bool:
    if "://" in value or value.startswith("file:"):
        return False
    if value in (".", "..") or value.startswith(_PATH_PREFIXES):
        return True
    return value.endswith(_ARCHIVE_SUFFIXES) and " " not in value and "@" not in value


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def requirement_lines(lines: Sequence[str], base_dir: Path) -> list[str]:
    """The lines of a requirements file for pip, paths resolved against ``base_dir``."""
    return [parse_requirement_line(line, base_dir).text for line in lines]
