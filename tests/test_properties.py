"""Property-based tests (hypothesis) of the pure core.

- MLproject parsing and parameter coercion raise nothing but aioproj errors, whatever the
  YAML document and whatever the values;
- a rendered command keeps every parameter value in exactly one shell word, byte for byte
  (checked with shlex and with a real bash running ``printf '%s\\0'``);
- project URI and ``#subdir`` splitting, URI classification and redaction are total and
  consistent;
- tracking keys that validate are safe file names;
- meta.yaml files written by the file store read back identically.

Every test is derandomized with a bounded number of examples, so CI sees the same inputs on
every run and the whole module takes a few seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import shlex
import shutil
import string
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from aioproj._redact import redact_credentials
from aioproj.errors import (
    AioprojError,
    InvalidArgumentError,
    MLprojectError,
    ParameterError,
    SourceError,
)
from aioproj.project import EntryPoint, Parameter, Project, parse_project, resolve_parameters
from aioproj.project.spec import EnvType
from aioproj.sources.uri import (
    archive_kind,
    check_git_url,
    is_git_uri,
    is_http_uri,
    local_path_of,
    parse_project_uri,
    redact_text,
    redact_url,
    split_subdirectory,
)
from aioproj.tracking.base import MAX_KEY_LENGTH, check_record, validate_key
from aioproj.tracking.mlruns import dump_yaml, load_yaml_text

from .support import property_settings

_settings = property_settings


DIRECTORY = Path("/nonexistent/project")
MLPROJECT = DIRECTORY / "MLproject"

# --------------------------------------------------------------------------- strategies

#: Text a command line can carry: any unicode but NUL and lone surrogates (which newer
#: hypothesis versions generate; they are ParameterErrors, tested on their own).
arg_text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40
)
tricky_text = st.sampled_from(
    ["'", '"', "$(touch pwned)", "`id`", "\n", "a b", "-", "--x", "\\", "$HOME", ";", "&&",
     "|", "*", "~", "!", "#", "{}", "{a}", "%s", "'\"'\"'", "\t", "é", "🎉", "\u2028", ""]
)  # fmt: skip
command_values = st.one_of(arg_text, tricky_text, st.lists(tricky_text).map("".join))

MLPROJECT_WORDS = st.sampled_from(
    ["name", "entry_points", "main", "other", "command", "parameters", "type", "default",
     "docker_env", "image", "volumes", "environment", "python_env", "conda_env", "alpha",
     "string", "float", "int", "bool", "path", "uri", "str", "integer", "boolean"]
)  # fmt: skip
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    MLPROJECT_WORDS,
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(MLPROJECT_WORDS, st.text(max_size=6)), children, max_size=4),
    ),
    max_leaves=25,
)
type_names = st.one_of(
    st.sampled_from(["string", "str", "float", "int", "integer", "bool", "boolean", "path",
                     "uri", "Float", "INT"]),
    st.text(max_size=8),
)  # fmt: skip
templates = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(st.text(max_size=5), st.sampled_from(["{a}", "{b}", "{a!r}", "{b:>5}",
                  "{", "}", "{{", "}}", "{a!x}", "{0}", "{a.b}", "{a[0]}", "{a:{b}}"])),
        max_size=6,
    ).map("".join),
)  # fmt: skip
parameter_specs = st.one_of(
    type_names,
    st.fixed_dictionaries({}, optional={"type": type_names, "default": yaml_values}),
    yaml_values,
)
entry_point_specs = st.fixed_dictionaries(
    {"command": st.one_of(templates, yaml_values)},
    optional={"parameters": st.dictionaries(st.sampled_from(["a", "b", "c"]), parameter_specs)},
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "name": yaml_values,
        "entry_points": st.one_of(
            st.dictionaries(st.sampled_from(["main", "other"]), entry_point_specs, max_size=2),
            yaml_values,
        ),
        "python_env": st.one_of(st.just("python_env.yaml"), yaml_values),
        "conda_env": st.one_of(st.just("conda.yaml"), yaml_values),
        "docker_env": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={"image": yaml_values, "volumes": yaml_values, "environment": yaml_values},
            ),
            yaml_values,
        ),
    },
)
parameter_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(10**5000),
    st.floats(),
    st.text(max_size=20),
    st.just("9" * 5000),
    st.sampled_from(["1", "-2", "0.5", "1e999", "nan", "true", "no", "s3://b/k", "file:///x",
                     "/tmp", "rel/path", ""]),
    st.lists(st.integers(), max_size=2),
)  # fmt: skip
user_parameters = st.dictionaries(
    st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=8)), parameter_values
)


def _parse(text: str, files_exist: bool) -> Project:
    """parse_project on ``text``; the only warnings allowed are UserWarnings (unknown types)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return parse_project(
                text,
                directory=DIRECTORY,
                mlproject_path=MLPROJECT,
                file_exists=lambda _path: files_exist,
            )
        finally:
            assert all(issubclass(w.category, UserWarning) for w in caught), caught


def _resolve_all(project: Project, params: Mapping[str, object], exists: bool) -> None:
    for entry_point in project.entry_points.values():
        with contextlib.suppress(AioprojError):
            resolve_parameters(
                project, entry_point, params, path_exists=lambda _p: exists, cwd=DIRECTORY
            )


# --------------------------------------------------------------------------- MLproject


@_settings(150)
@given(document=documents, files_exist=st.booleans(), params=user_parameters)
def test_structured_mlprojects_raise_only_aioproj_errors(
    document: dict[str, Any], files_exist: bool, params: dict[str, object]
) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        project = _parse(text, files_exist)
    except AioprojError:
        return
    _resolve_all(project, params, files_exist)


@_settings(200)
@given(document=yaml_values, files_exist=st.booleans())
def test_any_yaml_document_raises_only_aioproj_errors(document: object, files_exist: bool) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        project = _parse(text, files_exist)
    except AioprojError:
        return
    _resolve_all(project, {}, files_exist)


@_settings(300)
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                ["entry_points:", "\n", "  main:", "    command: ", "{", "[", "&a", "*a", "!!",
                 "!!python/object:os.system", "---", "...", "? ", ": ", "- ", "\t", "'", '"',
                 "%YAML 1.1", "!!binary AAAA", "!!set {a}", "2020-01-01", "<<: *a", "\x00"]
            ),
            max_size=30,
        ).map("".join),
    ),
    files_exist=st.booleans(),
)  # fmt: skip
def test_any_text_raises_only_aioproj_errors(text: str, files_exist: bool) -> None:
    try:
        project = _parse(text, files_exist)
    except AioprojError:
        return
    _resolve_all(project, {"a": "1"}, files_exist)


def test_deeply_nested_yaml_is_an_mlproject_error() -> None:
    flow = "[" * 100_000 + "]" * 100_000
    block = "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300))
    compact = "- " * 100_000 + "x\n"
    for text in (flow, block, compact):
        with pytest.raises(AioprojError, match="nests deeper than 100 levels"):
            _parse(text, True)


# --------------------------------------------------------------------------- coercion


def _one_parameter(kind: str, command: str = "run {a}") -> tuple[Project, EntryPoint]:
    entry_point = EntryPoint(
        name="main",
        parameters={"a": Parameter("a", kind, None, kind)},
        command=command,
    )
    project = Project(
        directory=DIRECTORY,
        name=None,
        env_type=EnvType.PYTHON,
        env_config_path=None,
        docker_env=None,
        entry_points={"main": entry_point},
        mlproject_path=MLPROJECT,
    )
    return project, entry_point


@_settings(500)
@given(
    kind=st.sampled_from(["string", "float", "int", "bool", "path", "uri"]),
    value=parameter_values,
    exists=st.booleans(),
)
def test_coercion_gives_the_declared_type_or_a_parameter_error(
    kind: str, value: object, exists: bool
) -> None:
    project, entry_point = _one_parameter(kind)
    try:
        resolved = resolve_parameters(
            project, entry_point, {"a": value}, path_exists=lambda _p: exists, cwd=DIRECTORY
        )
    except ParameterError:
        return
    typed = resolved.values["a"]
    expected: type | tuple[type, ...] = {
        "string": str, "float": float, "int": int, "bool": bool, "path": str, "uri": str
    }[kind]  # fmt: skip
    assert isinstance(typed, expected)
    if kind == "int":
        assert not isinstance(typed, bool)
    assert resolved.logged == {"a": str(value)}
    assert len(shlex.split(resolved.command)) == 2


# --------------------------------------------------------------------------- rendering

NAMES = ("a", "b")


def _words_project(command: str) -> tuple[Project, EntryPoint]:
    entry_point = EntryPoint(
        name="main",
        parameters={name: Parameter(name, "string", None, "string") for name in NAMES},
        command=command,
    )
    project = Project(
        directory=DIRECTORY,
        name=None,
        env_type=EnvType.PYTHON,
        env_config_path=None,
        docker_env=None,
        entry_points={"main": entry_point},
        mlproject_path=MLPROJECT,
    )
    return project, entry_point


extra_values = st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True).filter(
        lambda key: key not in NAMES
    ),
    command_values,
    max_size=3,
)


def _expected_words(a: str, b: str, extras: Mapping[str, str]) -> list[str]:
    words = [a, b]
    for key, value in extras.items():
        words += [f"--{key}", value]
    return words


@_settings(500)
@given(a=command_values, b=command_values, extras=extra_values)
def test_each_value_is_exactly_one_shell_word(a: str, b: str, extras: dict[str, str]) -> None:
    project, entry_point = _words_project("prog {a} {b}")
    command = resolve_parameters(project, entry_point, {"a": a, "b": b, **extras}).command
    assert shlex.split(command) == ["prog", *_expected_words(a, b, extras)]


@_settings(300)
@given(
    a=command_values,
    template=st.sampled_from(["{a!r}", "{a!a}", "{a!s}", "{a:>30}", "{a:<3}", "{a:^9}", "x{a}y"]),
)
def test_conversions_and_format_specs_never_split_a_value(a: str, template: str) -> None:
    project, entry_point = _words_project(f"prog {template} {{b}}")
    command = resolve_parameters(project, entry_point, {"a": a, "b": "end"}).command
    words = shlex.split(command)
    assert words[0] == "prog"
    assert words[-1] == "end"
    assert len(words) == 3, (template, a, command)


#: Format specs as an MLproject or a parameter value may write them: fill, align, sign,
#: widths and precisions from 0 to far past any command line, grouping, a type.
format_specs = st.builds(
    "{}{}{}{}{}{}".format,
    st.sampled_from(["", "<", ">", "^", "=", "x>", "0>", "9<", "{"]),
    st.sampled_from(["", "+", "-", " ", "#", "0", "z"]),
    st.one_of(st.just(""), st.integers(0, 10**12).map(str), st.sampled_from(["131072", "9" * 30])),
    st.sampled_from(["", ",", "_"]),
    st.one_of(st.just(""), st.integers(0, 10**10).map(".{}".format)),
    st.sampled_from(["", "s", "d", "f", "x", "%", "{w}", "}"]),
)


@_settings(400)
@given(spec=format_specs, width=st.one_of(st.integers(0, 10**12).map(str), arg_text), a=arg_text)
@example(spec=">500000000", width="0", a="x")
@example(spec=">{w}", width="2000000000", a="x")
@example(spec=".{w}", width="9" * 5000, a="x")
def test_any_format_spec_renders_bounded_or_is_an_aioproj_error(
    spec: str, width: str, a: str
) -> None:
    """Whatever the spec (written in the MLproject or filled from a parameter value), the
    command renders in bounded time and size, or parsing or rendering raises an aioproj
    error; never a gigabyte, never another exception."""
    from aioproj.project.parameters import command_limit

    text = yaml.safe_dump(
        {
            "entry_points": {
                "main": {
                    "parameters": {"a": {"type": "string"}, "w": {"type": "string"}},
                    "command": f"prog {{a:{spec}}}",
                }
            }
        }
    )
    try:
        project = parse_project(
            text, directory=DIRECTORY, mlproject_path=MLPROJECT, file_exists=lambda _: True
        )
        entry_point = project.get_entry_point("main")
        command = resolve_parameters(project, entry_point, {"a": a, "w": width}).command
    except (MLprojectError, ParameterError):
        return
    assert len(command.encode("utf-8", "surrogateescape")) <= command_limit()


BASH = shutil.which("bash")


@_settings(120)
@given(
    a=command_values,
    b=command_values,
    extras=extra_values,
    template=st.sampled_from(["{a} {b}", "{a!r} {b}", "{a!a} {b:>5}", "{a:<2} {b}"]),
)
def test_bash_receives_each_value_as_one_argument_with_identical_bytes(
    a: str, b: str, extras: dict[str, str], template: str
) -> None:
    assert BASH is not None
    project, entry_point = _words_project(f"printf '%s\\0' {template}")
    command = resolve_parameters(project, entry_point, {"a": a, "b": b, **extras}).command
    done = subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", command],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        check=True,
    )
    words = done.stdout.split(b"\0")[:-1]
    assert done.stderr == b""
    expected = _expected_words(a, b, extras)
    assert len(words) == len(expected), (command, words)
    if template == "{a} {b}":
        assert words == [word.encode() for word in expected]
    else:
        assert words[2:] == [word.encode() for word in expected[2:]]


# --------------------------------------------------------------------------- URIs

uri_text = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(["https://", "ssh://", "git@", "file://", "host", ":", "/", "#", ".",
                         "..", "sub", "@", "'", '"', " ", "x.zip", ".tar.gz", "?q=1", "%2F",
                         "user:pw@", "-o", "ext::", "[::1]", "[", "]", "[]", ":99999", "\n"]),
        max_size=12,
    ).map("".join),
)  # fmt: skip


@_settings(500)
@given(uri=uri_text)
# What other hypothesis versions found: a bracketed host that urlsplit refuses.
@example("http://[::1")
@example("https://[]/x.zip")
@example("A://[")
@example("file://[")
@example("https://user:pw@[::1/x.zip")
@example("ssh://[::1]:99999/x")
def test_project_uri_parsing_is_total_and_consistent(uri: str) -> None:
    # Classification and redaction never fail, whatever the string.
    for text in (uri, uri.partition("#")[0]):
        archive_kind(text)
        is_git_uri(text)
        is_http_uri(text)
        local_path_of(text)
        assert redact_url(redact_url(text)) == redact_url(text)
        redact_text(text, text)
    try:
        parsed = parse_project_uri(uri)
    except SourceError:
        return
    assert parsed.uri
    assert "#" not in parsed.base
    assert "." not in parsed.subdir
    assert not parsed.subdir.startswith("/")
    assert not parsed.subdir.endswith("/")
    assert parsed.uri.startswith(parsed.base)
    if "#" in parsed.uri:
        assert parsed.uri[len(parsed.base)] == "#"
        assert parsed.uri[len(parsed.base) + 1 :].strip("/") == parsed.subdir
    else:
        assert parsed.base == parsed.uri
        assert parsed.subdir == ""
    assert split_subdirectory(f"{parsed.base}#{parsed.subdir}") == (parsed.base, parsed.subdir)
    with contextlib.suppress(SourceError):
        check_git_url(parsed.base)


secret_text = st.text(string.ascii_letters + string.digits + "-_.~!$&'()*+,;=%", min_size=6)


@_settings(300)
@given(
    scheme=st.sampled_from(["https", "http", "ssh", "git"]),
    user=st.text(string.ascii_letters + string.digits, min_size=1, max_size=8),
    secret=secret_text,
    path=st.text(string.ascii_letters + "/", max_size=10),
)
def test_redaction_removes_the_password(scheme: str, user: str, secret: str, path: str) -> None:
    from urllib.parse import quote

    encoded = quote(secret, safe="")
    url = f"{scheme}://{user}:{encoded}@example.com/{path}"
    kept_user = "" if scheme.startswith("http") else f"{user}@"
    assert redact_url(url) == f"{scheme}://{kept_user}example.com/{path}"
    # A URL urlsplit refuses (an unclosed or empty bracketed host) loses its secret too.
    for host in ("[::1", "[]", "[x]", "h:99999"):
        malformed = f"{scheme}://{user}:{encoded}@{host}/{path}"
        assert redact_url(malformed) == f"{scheme}://{kept_user}{host}/{path}"
        assert encoded not in redact_text(f"bad {malformed}", malformed)
    # The one redaction path finds the URL in any text, by its shape alone.
    assert redact_credentials(f"got str {url!r}") == f"got str {redact_url(url)!r}"
    message = f"failed to fetch {url}: 401 for {secret} and {encoded}"
    cleaned = redact_text(message, url)
    assert secret not in cleaned
    assert encoded not in cleaned


# --------------------------------------------------------------------------- tracking keys

key_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(["a", "/", ".", "..", " ", ":", "-", "_", "é", "\n", "\\", "\x00"]),
             max_size=10).map("".join),
    st.just("k" * (MAX_KEY_LENGTH + 1)),
)  # fmt: skip


@_settings(500)
@given(key=key_text)
def test_accepted_tracking_keys_are_safe_relative_file_names(key: str) -> None:
    try:
        validate_key("param", key)
    except InvalidArgumentError:
        return
    assert 0 < len(key) <= MAX_KEY_LENGTH
    assert all(ch.isalnum() or ch == "_" or ch in "/.- :" for ch in key), key
    assert not key.startswith("/")
    assert ".." not in key.split("/")
    assert posixpath.normpath(key) == key
    root = "/store/params"
    assert posixpath.normpath(posixpath.join(root, key)).startswith(root + "/")


# --------------------------------------------------------------------------- user strings

#: Any text, and the text stores choke on: lone surrogates (undecodable file names), NUL,
#: control characters, URLs with passwords, names past every limit.
user_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(whitelist_categories=("Cs", "Cc", "Zs", "Ll")), max_size=10),
    st.sampled_from(["\ud800", "a\udcffb", "\0", "x\ny", "https://u:pw@h/x", "..", "/etc",
                     "'", "null", "~", "- x", "r" * 251, "e" * 501, "v" * 8001, ""]),
)  # fmt: skip


def _as_read(value: str, limit: int) -> str:
    """A tag or param value as the file store reads it back: without URL credentials, cut
    at ``limit``, and with ``\r`` read as ``\n`` (one file per value, read in text mode,
    as MLflow's own file store reads it)."""
    return redact_credentials(value)[:limit].replace("\r\n", "\n").replace("\r", "\n")


@_settings(200)
@given(
    run_name=st.one_of(st.none(), user_text),
    experiment_name=st.one_of(st.none(), user_text),
    tags=st.dictionaries(
        st.one_of(user_text, st.sampled_from(["t", "a/b"])), user_text, max_size=3
    ),
    params=st.dictionaries(st.one_of(user_text, st.sampled_from(["p"])), user_text, max_size=3),
)
@example(run_name="\ud800", experiment_name=None, tags={}, params={})
@example(run_name=None, experiment_name="\udcff", tags={}, params={})
@example(run_name=None, experiment_name=None, tags={"t": "\ud800"}, params={})
@example(run_name=None, experiment_name=None, tags={}, params={"p": "a\0b"})
@example(run_name="\r", experiment_name=None, tags={"t": "\r\n"}, params={"p": "\r"})
def test_any_user_string_is_recorded_or_refused_with_nothing_written(
    run_name: str | None,
    experiment_name: str | None,
    tags: dict[str, str],
    params: dict[str, str],
) -> None:
    """Run and experiment names, tag and param keys and values, whatever they hold: the
    file store records them (credentials removed, long values truncated) and reads them
    back, or refuses them with an aioproj error before it writes anything."""
    import tempfile

    import anyio

    from aioproj.tracking.file_store import FileStore

    with tempfile.TemporaryDirectory() as root:
        store = FileStore(root)

        async def record() -> str:
            try:
                check_record(
                    run_name=run_name, experiment_name=experiment_name, tags=tags, params=params
                )
                checked = True
            except InvalidArgumentError:
                checked = False
            try:
                experiment = await store.resolve_experiment(
                    experiment_name=experiment_name, experiment_id=None
                )
            except InvalidArgumentError:
                return "experiment refused"
            try:
                created = await store.create_run(
                    experiment, run_name=run_name, tags=tags, params=params
                )
            except InvalidArgumentError:
                return "run refused"
            assert checked or experiment_name == "", "the store took what check_record refused"
            back = await store.get_run(created.run_id)
            assert back.params == {k: _as_read(v, 6000) for k, v in params.items()}
            for key, value in tags.items():
                if key != "mlflow.runName":
                    assert back.tags[key] == _as_read(value, 8000)
            if run_name:
                assert back.run_name == redact_credentials(run_name)
            return "recorded"

        outcome = anyio.run(record)
        experiments = sorted(
            p.name for p in Path(root).iterdir() if p.is_dir() and p.name != ".trash"
        )
        runs = [p for e in experiments for p in (Path(root) / e).iterdir() if p.is_dir()]
        if outcome == "experiment refused":
            assert experiments in ([], ["0"])
        if outcome != "recorded":
            assert runs == []
        else:
            assert len(runs) == 1
            assert (runs[0] / "meta.yaml").is_file()


# --------------------------------------------------------------------------- meta.yaml

meta_values = st.one_of(st.none(), st.integers(), st.text(), st.booleans())
#: Keys like the store's own (``run_name``, ``end_time``): none is a YAML 1.1 boolean
#: (``on``, ``no``), which PyYAML would read back as True/False.
meta_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda key: key not in {"y", "n", "yes", "no", "on", "off", "true", "false"}
)


@_settings(200)
@given(run_name=meta_values, extra=st.dictionaries(meta_keys, meta_values))
def test_meta_yaml_round_trip(run_name: object, extra: dict[str, object]) -> None:
    meta = {**extra, "run_name": run_name, "status": 3, "tags": [], "end_time": None}
    text = dump_yaml(meta)
    assert load_yaml_text(text) == meta
    assert yaml.safe_load(text) == meta


def test_float_infinity_is_not_an_int() -> None:
    """A guard for the coercion property above: inf and nan pass as floats only."""
    project, entry_point = _one_parameter("float")
    resolved = resolve_parameters(project, entry_point, {"a": "1e999"})
    assert math.isinf(float(str(resolved.values["a"])))
