"""Parameter values: validation, coercion to their declared types, and command rendering.

Everything happens before a run is created, so a bad value never leaves a half-made run.
Three views of the parameters come out of :func:`resolve_parameters`:

- ``values``: typed values (``0.5``, ``3``, ``True``, an absolute path) for callers;
- ``logged``: the values as the user gave them, ``str()``'d and never shell-quoted, which is
  what tracking records as the run's params;
- ``command``: the entry point's command with shell-quoted values, extras appended.
"""

from __future__ import annotations

import heapq
import numbers
import os
import re
import shlex
import string
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aioproj._rules import MAX_KEY_LENGTH
from aioproj.errors import MLprojectError, ParameterError
from aioproj.project.spec import (
    MAX_ARG_STRLEN,
    EntryPoint,
    Parameter,
    Project,
    check_format_spec,
    parse_command_template,
)

__all__ = ["ResolvedParameters", "command_limit", "render_command", "resolve_parameters"]

_EXTRA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
_EXPECTED = {
    "float": "a float",
    "int": "an int",
    "bool": "a bool (true/false, 1/0, yes/no)",
    "path": "a path",
    "uri": "a URI",
}


@dataclass(frozen=True)
class ResolvedParameters:
    """The parameters of one run, resolved against an entry point.

    ``values`` holds typed values (declared parameters in declaration order, then extras as
    given); ``logged`` the same keys with the values as given, ``str()``'d (defaults as
    written); ``command`` the rendered shell command.
    """

    values: dict[str, object]
    logged: dict[str, str]
    command: str


@dataclass(frozen=True)
class _Context:
    """Where a value comes from, for error messages."""

    parameter: str
    entry_point: str
    is_default: bool

    def suffix(self) -> str:
        origin = " (its default in the MLproject)" if self.is_default else ""
        return f"{origin} (entry point {self.entry_point!r})"


def resolve_parameters(
    project: Project,
    entry_point: EntryPoint,
    user_parameters: Mapping[str, object] | None,
    *,
    path_exists: Callable[[Path], bool] | None = None,
    cwd: Path | None = None,
) -> ResolvedParameters:
    """Validate and coerce ``user_parameters`` for ``entry_point`` and render its command.

    Declared parameters take the user's value or their default; a user value of None counts
    as not given. Undeclared keys are extras: kept as given and appended to the command as
    ``--key 'value'``. Local ``path`` values are checked with ``path_exists`` (default
    :func:`os.path.exists`) relative to ``cwd`` (default the current directory) and made
    absolute; ``path`` values with a scheme other than ``file`` pass through unchanged.

    Raises:
        ParameterError: a required parameter has no value; a value (or default) does not
            fit its type, names a missing local path or is not a URI; an extra key is not a
            valid option name; the command uses a placeholder that is not a declared
            parameter.
        MLprojectError: the command template is malformed.
    """
    exists = path_exists if path_exists is not None else os.path.exists
    given = {str(key): value for key, value in (user_parameters or {}).items() if value is not None}
    _check_missing(entry_point, given)

    values: dict[str, object] = {}
    logged: dict[str, str] = {}
    rendered: dict[str, str] = {}
    for name, parameter in entry_point.parameters.items():
        is_default = name not in given
        raw = parameter.default if is_default else given[name]
        context = _Context(name, entry_point.name, is_default)
        values[name], rendered[name] = _coerce_value(
            parameter, raw, context=context, path_exists=exists, cwd=cwd
        )
        _check_command_text(rendered[name], context)
        logged[name] = _as_text(raw, context)

    limit = command_limit()
    extra_args: list[str] = []
    extra_bytes = 0
    for key, value in given.items():
        if key in entry_point.parameters:
            continue
        _check_extra_key(key, entry_point.name)
        context = _Context(key, entry_point.name, is_default=False)
        text = _as_text(value, context)
        extra_bytes += _check_command_text(text, context) + len(key) + 4
        if extra_bytes > limit:  # stop early: 100,000 extras are refused after a few
            raise _too_long(entry_point.name, extra_bytes, limit, given)
        values[key] = value
        logged[key] = text
        extra_args.append(f"--{key} {shlex.quote(text)}")

    quoted = {name: shlex.quote(text) for name, text in rendered.items()}
    command = render_command(
        entry_point.command,
        quoted,
        entry_point=entry_point.name,
        mlproject_path=project.mlproject_path,
    )
    full = " ".join([command, *extra_args])
    size = len(full.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise _too_long(entry_point.name, size, limit, given)
    return ResolvedParameters(values=values, logged=logged, command=full)


def _too_long(
    entry_point: str, size: int, limit: int, given: Mapping[str, object]
) -> ParameterError:
    """The error for a command longer than a command line can hold."""
    sizes = heapq.nlargest(3, ((len(v) if isinstance(v, str) else 0, k) for k, v in given.items()))
    largest = ", ".join(f"{key!r} ({n:,} characters)" for n, key in sizes if n >= 1024)
    return ParameterError(
        f"The command of entry point {entry_point!r} would be at least {size:,} bytes with its"
        f" {len(given):,} parameters; a command line holds at most {limit:,} bytes (one"
        f" argument, MAX_ARG_STRLEN, within SC_ARG_MAX with this environment). Pass fewer or"
        f" shorter parameters, or large data in a file."
        + (f" The longest: {largest}." if largest else "")
    )


def _check_missing(entry_point: EntryPoint, given: Mapping[str, object]) -> None:
    missing = [
        name
        for name, parameter in entry_point.parameters.items()
        if parameter.default is None and name not in given
    ]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise ParameterError(
            f"No value given for missing parameters: {names} (entry point {entry_point.name!r})"
        )


def _check_extra_key(key: str, entry_point: str) -> None:
    if _EXTRA_KEY.fullmatch(key) is None or len(key) > MAX_KEY_LENGTH:
        raise ParameterError(
            f"Parameter name {key!r} is not declared by entry point {entry_point!r} and cannot "
            "be passed as an extra option: extra names must match [A-Za-z_][A-Za-z0-9_.-]* "
            f"and have at most {MAX_KEY_LENGTH} characters"
        )


def _as_text(raw: object, context: _Context) -> str:
    """``str(raw)``; a value Python will not turn into text is a ParameterError.

    (An int of more than 4300 digits is one: ``str()`` refuses it.)
    """
    if isinstance(raw, str):
        return raw
    try:
        return str(raw)
    except ValueError as exc:
        raise ParameterError(
            f"Parameter {context.parameter!r} of entry point {context.entry_point!r} has a "
            f"value of type {type(raw).__name__} that cannot be written as text: {exc}"
        ) from None


def _check_command_text(text: str, context: _Context) -> int:
    """Refuse text that cannot travel in a command line: NUL, unencodable surrogates, more
    bytes than one argument holds. Returns its size in bytes."""
    problem = None
    size = 0
    if "\0" in text:
        problem = "contains a NUL character"
    elif len(text) >= MAX_ARG_STRLEN:  # before encoding: a gigabyte is refused at once
        problem = f"is {len(text):,} characters long"
    else:
        try:
            size = len(text.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            problem = "contains a lone surrogate that cannot be encoded"
        if size >= MAX_ARG_STRLEN:
            problem = f"is {size:,} bytes long"
    if problem is not None:
        raise ParameterError(
            f"The value of parameter {context.parameter!r} of entry point "
            f"{context.entry_point!r} {problem}, which no command line can carry"
            f" (one argument holds less than {MAX_ARG_STRLEN:,} bytes: pass large data in a"
            " file)." + (" (its default in the MLproject)" if context.is_default else "")
        )
    return size


def command_limit() -> int:
    """The most bytes a rendered command may have.

    A run is ``bash -c <script>``: one argument, less than :data:`MAX_ARG_STRLEN` bytes,
    holding the command and what a backend puts around it (``cd -- <directory>``, an
    environment's activation: :data:`_WRAPPER_MARGIN`). With this process's environment it
    must also fit in ``SC_ARG_MAX``, the kernel's limit on arguments and environment
    together, less what a run adds to the environment (``MLFLOW_RUN_ID``, ...).
    """
    try:
        total = os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        total = 2 * 1024 * 1024
    environment = sum(len(k) + len(v) + 2 + 8 for k, v in os.environ.items())
    one_argument = MAX_ARG_STRLEN - 1 - _WRAPPER_MARGIN
    return max(0, min(one_argument, total - environment - _WRAPPER_MARGIN - _ENV_MARGIN))


#: Room in the one argument for ``cd -- <directory>`` and an activation (two paths of up
#: to PATH_MAX bytes).
_WRAPPER_MARGIN = 8 * 1024
#: Room for what a run adds to the environment (tracking variables).
_ENV_MARGIN = 16 * 1024


# --------------------------------------------------------------------------- coercion


def _coerce_value(
    parameter: Parameter,
    raw: object,
    *,
    context: _Context,
    path_exists: Callable[[Path], bool],
    cwd: Path | None,
) -> tuple[object, str]:
    """The typed value of ``raw`` and the text the command gets for it (before quoting).

    Raises:
        ParameterError: ``raw`` does not fit ``parameter.type``.
    """
    kind = parameter.type
    if kind == "float":
        return _coerce_float(raw, context), _as_text(raw, context)
    if kind == "int":
        return _coerce_int(raw, context), _as_text(raw, context)
    if kind == "bool":
        return _coerce_bool(raw, context), _as_text(raw, context)
    if kind == "path":
        path = _coerce_path(raw, context, path_exists, cwd)
        return path, path
    if kind == "uri":
        return _coerce_uri(raw, context), _as_text(raw, context)
    text = _as_text(raw, context)
    return text, text


def _shown(raw: object, limit: int = 200) -> str:
    """``repr(raw)`` for a message, shortened; never fails (huge ints refuse ``repr``)."""
    try:
        text = repr(raw)
    except ValueError:
        return f"<{type(raw).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def _type_error(kind: str, raw: object, context: _Context) -> ParameterError:
    return ParameterError(
        f"Parameter {context.parameter!r} of entry point {context.entry_point!r} expects "
        f"{_EXPECTED[kind]}, got {_shown(raw)}"
        + (" (its default in the MLproject)" if context.is_default else "")
    )


def _coerce_float(raw: object, context: _Context) -> float:
    if isinstance(raw, bool):
        raise _type_error("float", raw, context)
    if isinstance(raw, numbers.Real):
        try:
            return float(raw)
        except OverflowError:
            raise _type_error("float", raw, context) from None
    if isinstance(raw, str) and "_" not in raw:
        try:
            return float(raw)
        except ValueError:
            pass
    raise _type_error("float", raw, context)


def _coerce_int(raw: object, context: _Context) -> int:
    if isinstance(raw, bool):
        raise _type_error("int", raw, context)
    if isinstance(raw, numbers.Integral):
        return int(raw)
    if isinstance(raw, str) and _INT_TEXT.fullmatch(raw.strip()):
        try:
            return int(raw)
        except ValueError:  # more digits than Python converts
            pass
    raise _type_error("int", raw, context)


def _coerce_bool(raw: object, context: _Context) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, numbers.Integral) and int(raw) in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _type_error("bool", raw, context)


def _coerce_path(
    raw: object, context: _Context, path_exists: Callable[[Path], bool], cwd: Path | None
) -> str:
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str) or not raw:
        raise _type_error("path", raw, context)
    local = local_path_of(raw)
    if local is None:
        return raw
    # The current directory is looked up only here: a syscall callers off the event loop
    # can afford, and entry points without path parameters never make.
    absolute = os.path.normpath(os.path.join(cwd if cwd is not None else os.getcwd(), local))
    if not path_exists(Path(absolute)):
        raise ParameterError(
            f"Got value {raw} for parameter {context.parameter}, but no such file or directory "
            f"was found.{context.suffix()}"
        )
    return absolute


def local_path_of(value: str) -> str | None:
    """The local path a ``path`` value names, or None when it is a remote URI.

    A value with no scheme, a one-letter scheme (a Windows drive) or ``file:`` without a
    host is local.
    """
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return value
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return urllib.parse.unquote(parsed.path)
    return None


def _coerce_uri(raw: object, context: _Context) -> str:
    if not isinstance(raw, str) or urllib.parse.urlparse(raw).scheme == "":
        raise ParameterError(
            f"Expected URI for parameter {context.parameter} but got "
            f"{raw if isinstance(raw, str) and len(raw) <= 200 else _shown(raw)}"
            f"{context.suffix()}"
        )
    return raw


# --------------------------------------------------------------------------- command


def render_command(
    template: str,
    quoted: Mapping[str, str],
    *,
    entry_point: str,
    mlproject_path: Path | None = None,
) -> str:
    """Fill ``template`` (``str.format`` syntax) with the already shell-quoted values.

    A placeholder must be exactly a declared parameter name (``{alpha}``); literal braces are
    written ``{{`` and ``}}``. A format spec applies to the quoted text, as in MLflow; the
    ``!r`` and ``!a`` conversions apply to the value and their result is quoted again, so
    the value stays one shell word.

    Raises:
        ParameterError: a placeholder is not a declared parameter.
        MLprojectError: the template is malformed.
    """
    where = str(mlproject_path) if mlproject_path is not None else None
    try:
        parts = parse_command_template(template)
    except ValueError as exc:
        raise MLprojectError(
            f"entry point {entry_point!r} has a malformed command {template!r}: {exc}",
            path=where,
        ) from None
    formatter = string.Formatter()
    out: list[str] = []
    for literal, field, spec, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if field not in quoted:
            raise ParameterError(
                f"The command of entry point {entry_point!r} uses placeholder {{{field}}}, "
                f"which is not a declared parameter (declared: {sorted(quoted)})"
            )
        value: object = quoted[field]
        if conversion in ("r", "a"):
            # repr() of shell-quoted text re-escapes its quotes and would let the value out
            # of its shell word: convert the value itself, then quote the result.
            value = shlex.quote(formatter.convert_field(shlex.split(quoted[field])[0], conversion))
        filled_spec = render_command(
            spec, quoted, entry_point=entry_point, mlproject_path=mlproject_path
        )
        try:
            check_format_spec(filled_spec, field)
        except ValueError as exc:
            if filled_spec == spec:  # written in the MLproject
                raise MLprojectError(f"entry point {entry_point!r}: {exc}", path=where) from None
            raise ParameterError(  # a parameter value filled it in: {b:>{width}}
                f"The command of entry point {entry_point!r}: {exc} (the spec is filled from"
                " a parameter value)"
            ) from None
        try:
            out.append(format(value, filled_spec))
        except ValueError as exc:
            raise MLprojectError(
                f"entry point {entry_point!r} has a malformed command {template!r}: {exc}",
                path=where,
            ) from None
    return "".join(out)
