"""The MLproject file: discovery, parsing and schema validation.

:func:`load_project` reads a project directory; :func:`parse_project` does the same from
the MLproject text without touching the disk (file existence is asked through a callback),
so every rule here is testable as a pure function.

Schema errors name the file, the key path (``entry_points.main.parameters.alpha``) and the
line of that key, found by composing the YAML node tree only when an error is reported.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
import string
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from aioproj._redact import warn
from aioproj._rules import validate_key
from aioproj.errors import EntryPointError, InvalidArgumentError, MLprojectError, SourceError
from aioproj.project._yaml import (
    MAX_MLPROJECT_BYTES,
    MAX_MLPROJECT_NESTING,
    Document,
    check_size,
    is_scalar,
    kind_of,
)

__all__ = [
    "MAX_ARG_STRLEN",
    "MAX_MLPROJECT_BYTES",
    "MAX_MLPROJECT_NESTING",
    "SUPPORTED_SCRIPT_EXTENSIONS",
    "DockerEnv",
    "EntryPoint",
    "EnvType",
    "Parameter",
    "Project",
    "TemplatePart",
    "check_format_spec",
    "load_project",
    "parse_command_template",
    "parse_project",
]

MLPROJECT_FILE_NAME = "mlproject"
PYTHON_ENV_FILE_NAME = "python_env.yaml"
CONDA_ENV_FILE_NAME = "conda.yaml"
SUPPORTED_SCRIPT_EXTENSIONS = (".py", ".sh", ".R")
#: Linux's limit on one command-line argument, the terminating NUL included
#: (``MAX_ARG_STRLEN``, 32 pages). A command runs as ``bash -c <command>``: one argument.
MAX_ARG_STRLEN = 128 * 1024

# Type names accepted in an MLproject (lowercased) and the type aioproj treats them as.
_TYPE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "string": "string",
        "str": "string",
        "float": "float",
        "int": "int",
        "integer": "int",
        "bool": "bool",
        "boolean": "bool",
        "path": "path",
        "uri": "uri",
    }
)
_PARAMETER_SPEC_KEYS = frozenset({"type", "default"})
_CONVERSIONS = frozenset({"r", "s", "a"})


class EnvType(str, enum.Enum):
    """The kind of environment a project declares."""

    PYTHON = "python_env"
    CONDA = "conda_env"
    DOCKER = "docker_env"


@dataclass(frozen=True)
class DockerEnv:
    """The ``docker_env`` section.

    ``environment`` items are either ``"NAME"`` (copied from the host environment) or
    ``(NAME, value)`` (defined with that value).
    """

    image: str
    volumes: tuple[str, ...] = ()
    environment: tuple[str | tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of an entry point.

    ``type`` is the normalised type (``string``, ``float``, ``int``, ``bool``, ``path``,
    ``uri``); ``declared_type`` is the name as written in the MLproject. ``default`` is the
    default as written (``str()``'d), or None when the parameter is required.
    """

    name: str
    type: str
    default: str | None
    declared_type: str


@dataclass(frozen=True)
class EntryPoint:
    """An entry point: its parameters in declaration order and its command template."""

    name: str
    parameters: Mapping[str, Parameter]
    command: str


@dataclass(frozen=True)
class Project:
    """A parsed project directory."""

    directory: Path
    name: str | None
    env_type: EnvType
    env_config_path: Path | None
    docker_env: DockerEnv | None
    entry_points: Mapping[str, EntryPoint]
    mlproject_path: Path | None

    def get_entry_point(self, name: str) -> EntryPoint:
        """Return the entry point called ``name``.

        A name that is not declared is run as a script when its extension allows it:
        ``.py`` with ``python``, ``.sh`` with ``$SHELL`` (``bash`` when unset), ``.R``
        with ``Rscript`` through ``mlflow::mlflow_source``. The script's existence is not
        checked.

        Raises:
            EntryPointError: ``name`` is neither declared nor a supported script.
        """
        if name in self.entry_points:
            return self.entry_points[name]
        command = script_command(name, shell=os.environ.get("SHELL", "bash"))
        if command is None:
            raise EntryPointError(
                f"Could not find {name} among entry points {list(self.entry_points)} or "
                f"interpret {name} as a runnable script. Supported script file extensions: "
                f"{list(SUPPORTED_SCRIPT_EXTENSIONS)}"
            )
        return EntryPoint(name=name, parameters=types.MappingProxyType({}), command=command)


def script_command(name: str, *, shell: str) -> str | None:
    """The command that runs script ``name``, or None if its extension is not supported.

    An ``.R`` script runs as MLflow runs it (``Project.get_entry_point``): ``Rscript -e
    "mlflow::mlflow_source('<name>')" --args``, extra parameters following ``--args``. A
    name that needs shell quoting (MLflow's nested quotes would break on it) becomes an
    R string literal in one shell-quoted word instead.
    """
    extension = os.path.splitext(name)[1]
    if extension == ".py":
        return f"python {shlex.quote(name)}"
    if extension == ".sh":
        return f"{shell} {shlex.quote(name)}"
    if extension == ".R":
        if shlex.quote(name) == name:  # no quote, backslash, $ or space: MLflow's form
            return f"Rscript -e \"mlflow::mlflow_source('{name}')\" --args"
        literal = "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return f"Rscript -e {shlex.quote(f'mlflow::mlflow_source({literal})')} --args"
    return None


# --------------------------------------------------------------------------- command template

TemplatePart: TypeAlias = tuple[str, str | None, str, str | None]
"""``(literal, field_name, format_spec, conversion)`` as :meth:`string.Formatter.parse` yields."""


def parse_command_template(command: str) -> list[TemplatePart]:
    """Split a command template (Python ``str.format`` syntax) into its parts.

    Nested fields in format specs are checked too, and so are the widths and precisions
    written in them: rendering ``{b:>500000000}`` would build half a gigabyte, on the
    event loop, for a command no system can start.

    Raises:
        ValueError: the template is malformed (unbalanced braces, unknown conversion), or
            a format spec holds a number of :data:`MAX_ARG_STRLEN` or more.
    """
    parts: list[TemplatePart] = []
    for literal, field, spec, conversion in string.Formatter().parse(command):
        if conversion is not None and conversion not in _CONVERSIONS:
            raise ValueError(f"Unknown conversion specifier {conversion!r} in {{{field}}}")
        if spec:
            nested = parse_command_template(spec)
            check_format_spec("".join(part[0] for part in nested), field)
        parts.append((literal, field, spec or "", conversion))
    return parts


_NUMBER = re.compile(r"[0-9]+")


class FormatSpecTooWide(ValueError):
    """A format spec's width or precision is larger than any command line."""


def check_format_spec(spec: str, field: str | None) -> None:
    """Refuse a format spec whose width or precision no command line could hold.

    Raises:
        FormatSpecTooWide: a number in ``spec`` is :data:`MAX_ARG_STRLEN` or more.
    """
    for number in _NUMBER.findall(spec):
        digits = number.lstrip("0")
        if len(digits) > 7 or (digits and int(digits) >= MAX_ARG_STRLEN):
            shown = digits if len(digits) <= 20 else f"{digits[:10]}...({len(digits)} digits)"
            raise FormatSpecTooWide(
                f"the format spec of {{{field}}} asks for a width or precision of {shown}; "
                f"a command-line argument holds less than {MAX_ARG_STRLEN:,} bytes"
            )


# --------------------------------------------------------------------------- loading


def load_project(directory: Path) -> Project:
    """Read and parse the project in ``directory`` (blocking; run it in a worker thread).

    Raises:
        SourceError: ``directory`` is not a readable directory.
        MLprojectError: the MLproject file cannot be read or is malformed, or an env file
            it names does not exist.
    """
    directory = Path(os.path.abspath(directory))
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise SourceError(f"Project directory {directory} cannot be read: {exc}") from exc
    mlproject_path = find_mlproject(entries, directory=directory, is_file=os.path.isfile)
    text: str | None = None
    if mlproject_path is not None:
        try:
            with mlproject_path.open("rb") as f:
                data = f.read(MAX_MLPROJECT_BYTES + 1)
            check_size(len(data), str(mlproject_path))
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MLprojectError(
                f"cannot read MLproject file: {exc}", path=str(mlproject_path)
            ) from exc
    return parse_project(
        text, directory=directory, mlproject_path=mlproject_path, file_exists=os.path.isfile
    )


def find_mlproject(
    entries: Sequence[str], *, directory: Path, is_file: Callable[[Path], bool]
) -> Path | None:
    """The first entry whose lowercased name is ``mlproject`` and is a file, or None."""
    for entry in entries:
        if entry.lower() == MLPROJECT_FILE_NAME and is_file(directory / entry):
            return directory / entry
    return None


def parse_project(
    text: str | None,
    *,
    directory: Path,
    mlproject_path: Path | None,
    file_exists: Callable[[Path], bool],
) -> Project:
    """Build a :class:`Project` from the MLproject text (None when there is no file).

    Raises:
        MLprojectError: the text is not YAML, is empty, is not a mapping, breaks the schema,
            declares several environments, or names an env file that does not exist.
    Warns:
        UserWarning: a parameter has a type name aioproj does not know (it is a string).
    """
    directory = Path(os.path.abspath(directory))
    if text is None:
        return Project(
            directory=directory,
            name=None,
            env_type=_conventional_env_type(directory, file_exists),
            env_config_path=_conventional_env_path(directory, file_exists),
            docker_env=None,
            entry_points=types.MappingProxyType({}),
            mlproject_path=None,
        )
    doc = Document(text, str(mlproject_path) if mlproject_path is not None else "MLproject")
    data = doc.load()
    env_type, env_config_path, docker_env = _parse_environment(data, directory, file_exists, doc)
    return Project(
        directory=directory,
        name=_parse_name(data.get("name"), doc),
        env_type=env_type,
        env_config_path=env_config_path,
        docker_env=docker_env,
        entry_points=_parse_entry_points(data.get("entry_points"), doc),
        mlproject_path=mlproject_path,
    )


def _parse_name(value: object, doc: Document) -> str | None:
    if value is None:
        return None
    if not is_scalar(value):
        raise doc.error(["name"], f"must be a string, got {kind_of(value)}")
    return str(value)


# --------------------------------------------------------------------------- environment

_ENV_KEYS = tuple(env.value for env in EnvType)


def _parse_environment(
    data: Mapping[str, object],
    directory: Path,
    file_exists: Callable[[Path], bool],
    doc: Document,
) -> tuple[EnvType, Path | None, DockerEnv | None]:
    present = [key for key in data if key in _ENV_KEYS]
    if len(present) > 1:
        names = ", ".join(repr(key) for key in present)
        raise MLprojectError(
            f"Project cannot contain multiple environment fields: {{{names}}}",
            path=doc.path,
            line=doc.line_of([present[1]]),
        )
    if not present:
        return (
            _conventional_env_type(directory, file_exists),
            _conventional_env_path(directory, file_exists),
            None,
        )
    key = present[0]
    if key == EnvType.DOCKER.value:
        return EnvType.DOCKER, None, _parse_docker_env(data[key], doc)
    value = data[key]
    if not isinstance(value, str) or not value:
        raise doc.error([key], f"must be the name of a file, got {kind_of(value)}")
    path = directory / value
    if not file_exists(path):
        what = "python_env file" if key == EnvType.PYTHON.value else "conda environment file"
        raise MLprojectError(
            f"Project specified {what} {path}, but no such file was found.",
            path=doc.path,
            line=doc.line_of([key]),
        )
    return EnvType(key), path, None


def _conventional_env_type(directory: Path, file_exists: Callable[[Path], bool]) -> EnvType:
    if file_exists(directory / PYTHON_ENV_FILE_NAME):
        return EnvType.PYTHON
    if file_exists(directory / CONDA_ENV_FILE_NAME):
        return EnvType.CONDA
    return EnvType.PYTHON


def _conventional_env_path(directory: Path, file_exists: Callable[[Path], bool]) -> Path | None:
    for name in (PYTHON_ENV_FILE_NAME, CONDA_ENV_FILE_NAME):
        if file_exists(directory / name):
            return directory / name
    return None


def _parse_docker_env(value: object, doc: Document) -> DockerEnv:
    if value is not None and not isinstance(value, dict):
        raise doc.error(["docker_env"], f"must be a mapping with an image, got {kind_of(value)}")
    spec: dict[object, object] = value or {}
    image = spec.get("image")
    if image is None or image == "":
        raise MLprojectError(
            "Project configuration (MLproject file) was invalid: Docker environment specified "
            "but no image attribute found.",
            path=doc.path,
            line=doc.line_of(["docker_env"]),
        )
    if not isinstance(image, str):
        raise doc.error(["docker_env", "image"], f"must be a string, got {kind_of(image)}")
    return DockerEnv(
        image=image,
        volumes=_parse_volumes(spec.get("volumes"), doc),
        environment=_parse_docker_environment(spec.get("environment"), doc),
    )


def _parse_volumes(value: object, doc: Document) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise doc.error(
            ["docker_env", "volumes"],
            "Docker volumes must be a list of strings, "
            'e.g.: \'["/path1/:/path1", "/path2/:/path2"]\'',
        )
    return tuple(value)


def _parse_docker_environment(value: object, doc: Document) -> tuple[str | tuple[str, str], ...]:
    if value is None:
        return ()
    message = (
        "environment must be a list containing either strings (to copy environment variables "
        "from the host) or lists of string pairs (to define new environment variables), "
        'e.g.: \'[["NEW_VAR", "value"], "VAR_TO_COPY_FROM_HOST"]\''
    )
    if not isinstance(value, list):
        raise doc.error(["docker_env", "environment"], message)
    items: list[str | tuple[str, str]] = []
    for item in value:
        if isinstance(item, str) and item:
            items.append(_env_name(item, doc))
        elif (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and item[0]
            and is_scalar(item[1])
        ):
            defined = str(item[1])
            if "\0" in defined:
                raise doc.error(
                    ["docker_env", "environment"],
                    f"the value of {item[0]!r} contains a NUL character, which no environment "
                    "variable can hold",
                )
            items.append((_env_name(item[0], doc), defined))
        else:
            raise doc.error(["docker_env", "environment"], message)
    return tuple(items)


_BAD_ENV_NAME = re.compile(r"^-|[=\s\x00]")


def _env_name(name: str, doc: Document) -> str:
    """An environment variable name as ``docker run -e NAME`` and the OS can take it."""
    if _BAD_ENV_NAME.search(name):
        raise doc.error(
            ["docker_env", "environment"],
            f"{name!r} is not an environment variable name: a name has no '=', whitespace "
            "or NUL and does not begin with '-'",
        )
    return name


# --------------------------------------------------------------------------- entry points


def _parse_entry_points(value: object, doc: Document) -> Mapping[str, EntryPoint]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, dict):
        raise doc.error(["entry_points"], f"must be a mapping of names, got {kind_of(value)}")
    entry_points: dict[str, EntryPoint] = {}
    for raw_name, spec in value.items():
        name = str(raw_name)
        entry_points[name] = _parse_entry_point(name, spec, doc)
    return types.MappingProxyType(entry_points)


def _parse_entry_point(name: str, spec: object, doc: Document) -> EntryPoint:
    keys = ["entry_points", name]
    if not isinstance(spec, dict):
        raise doc.error(keys, f"must be a mapping with a command, got {kind_of(spec)}")
    command = spec.get("command")
    if command is None:
        raise doc.error(keys, "has no command")
    if not isinstance(command, str):
        raise doc.error([*keys, "command"], f"must be a string, got {kind_of(command)}")
    if "\0" in command:
        raise doc.error([*keys, "command"], "contains a NUL character, which no shell can run")
    if len(command.encode("utf-8", "surrogateescape")) >= MAX_ARG_STRLEN:
        raise doc.error(
            [*keys, "command"],
            f"is {len(command):,} characters long; a command line holds less than"
            f" {MAX_ARG_STRLEN:,} bytes in one argument",
        )
    try:
        parse_command_template(command)
    except FormatSpecTooWide as exc:
        raise doc.error([*keys, "command"], f"cannot be rendered: {exc}") from None
    except ValueError as exc:
        raise doc.error(
            [*keys, "command"],
            f"is not a valid command template ({exc}); write literal braces as {{{{ and }}}}",
        ) from None
    return EntryPoint(
        name=name,
        parameters=_parse_parameters(name, spec.get("parameters"), doc),
        command=command,
    )


def _parse_parameters(entry_point: str, value: object, doc: Document) -> Mapping[str, Parameter]:
    keys = ["entry_points", entry_point, "parameters"]
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, dict):
        raise doc.error(keys, f"must be a mapping of parameter names, got {kind_of(value)}")
    parameters: dict[str, Parameter] = {}
    for raw_name, spec in value.items():
        name = str(raw_name)
        try:
            validate_key("param", name)
        except InvalidArgumentError as exc:
            raise doc.error(
                [*keys, name],
                f"cannot be a parameter name: runs record parameters under their names. {exc}",
            ) from None
        parameters[name] = _parse_parameter(entry_point, name, spec, doc)
    return types.MappingProxyType(parameters)


def _parse_parameter(entry_point: str, name: str, spec: object, doc: Document) -> Parameter:
    keys = ["entry_points", entry_point, "parameters", name]
    if isinstance(spec, str):
        declared_type, default = spec, None
    elif isinstance(spec, dict):
        unknown = sorted(str(key) for key in spec if key not in _PARAMETER_SPEC_KEYS)
        if unknown:
            raise doc.error(
                keys, f"unknown keys {unknown} in parameter spec (allowed: 'type', 'default')"
            )
        declared_type = spec.get("type", "string")
        if not isinstance(declared_type, str):
            raise doc.error([*keys, "type"], f"must be a type name, got {kind_of(declared_type)}")
        raw_default = spec.get("default")
        if raw_default is not None and not is_scalar(raw_default):
            raise doc.error([*keys, "default"], f"must be a scalar, got {kind_of(raw_default)}")
        default = None if raw_default is None else str(raw_default)
    else:
        raise doc.error(
            keys,
            f"must be a type name or a mapping with 'type' and 'default', got {kind_of(spec)}",
        )
    return Parameter(
        name=name,
        type=normalise_type(declared_type, parameter=name, entry_point=entry_point),
        default=default,
        declared_type=declared_type,
    )


def normalise_type(declared_type: str, *, parameter: str, entry_point: str) -> str:
    """The aioproj type for a declared type name (case-insensitive).

    Warns:
        UserWarning: the name is unknown; the parameter is then treated as a string.
    """
    normalised = _TYPE_ALIASES.get(declared_type.strip().lower())
    if normalised is None:
        warn(
            f"Parameter {parameter!r} of entry point {entry_point!r} has unknown type "
            f"{declared_type!r}; it is treated as a string. Known types: "
            f"{', '.join(_TYPE_ALIASES)}.",
            UserWarning,
            stacklevel=2,
        )
        return "string"
    return normalised
