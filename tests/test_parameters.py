"""Parameter validation, coercion, logging views and command rendering."""

from __future__ import annotations

import math
import shlex
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from aioproj.errors import MLprojectError, ParameterError
from aioproj.project import (
    EntryPoint,
    Parameter,
    Project,
    ResolvedParameters,
    load_project,
    resolve_parameters,
)

GREETER_MLPROJECT = """\
conda_env: conda.yaml
entry_points:
  greeter:
    parameters:
      greeting: {type: string, default: "hi"}
      name: string
    command: "python greeter.py {greeting} {name}"
  line_count:
    parameters:
      path: path
    command: "cat {path} | wc -l"
  download_uri:
    parameters:
      uri: uri
    command: "curl {uri} | wc -l"
"""


@pytest.fixture
def example(tmp_path: Path) -> Project:
    (tmp_path / "MLproject").write_text(GREETER_MLPROJECT)
    (tmp_path / "conda.yaml").write_text("name: x\ndependencies: [python=3.10]\n")
    return load_project(tmp_path)


def project_with(tmp_path: Path, parameters: str, command: str) -> Project:
    """A project whose `main` entry point has the given parameters block and command."""
    body = textwrap.indent(textwrap.dedent(parameters), " " * 6)
    (tmp_path / "MLproject").write_text(
        f"entry_points:\n  main:\n    command: {command!r}\n    parameters:\n{body}"
    )
    return load_project(tmp_path)


def resolve(
    project: Project,
    params: Mapping[str, object] | None,
    entry_point: str = "main",
    *,
    path_exists: Callable[[Path], bool] | None = None,
    cwd: Path | None = None,
) -> ResolvedParameters:
    return resolve_parameters(
        project, project.get_entry_point(entry_point), params, path_exists=path_exists, cwd=cwd
    )


def error_of(project: Project, params: Mapping[str, object], entry_point: str = "main") -> str:
    with pytest.raises(ParameterError) as info:
        resolve(project, params, entry_point)
    return str(info.value)


# --------------------------------------------------------------------------- greeter


def test_greeter_defaults_and_extras_render_mlflow_command(example: Project) -> None:
    resolved = resolve(example, {"name": "friend", "excitement": 10}, "greeter")
    assert resolved.command == "python greeter.py hi friend --excitement 10"
    assert resolved.values == {"greeting": "hi", "name": "friend", "excitement": 10}
    assert resolved.logged == {"greeting": "hi", "name": "friend", "excitement": "10"}


def test_values_are_shell_quoted_in_command_but_not_in_logged(example: Project) -> None:
    dangerous = "a b; rm -rf /"
    resolved = resolve(example, {"name": dangerous, "greeting": "it's"}, "greeter")
    assert resolved.command == "python greeter.py 'it'\"'\"'s' 'a b; rm -rf /'"
    assert shlex.split(resolved.command) == ["python", "greeter.py", "it's", dangerous]
    assert resolved.logged["name"] == dangerous
    assert resolved.logged["greeting"] == "it's"


def test_extra_values_are_quoted(example: Project) -> None:
    resolved = resolve(example, {"name": "x", "note": "$(whoami) `id`"}, "greeter")
    assert resolved.command.endswith("--note '$(whoami) `id`'")
    assert shlex.split(resolved.command)[-1] == "$(whoami) `id`"


def test_extras_keep_their_order_and_case(example: Project) -> None:
    resolved = resolve(example, {"Zeta": 1, "name": "x", "alpha": "A", "a.b-c": 2}, "greeter")
    assert list(resolved.values) == ["greeting", "name", "Zeta", "alpha", "a.b-c"]
    assert resolved.command == "python greeter.py hi x --Zeta 1 --alpha A --a.b-c 2"


@pytest.mark.parametrize("key", ["bad key", "-x", "x;rm", "1abc", "", "a$b"])
def test_invalid_extra_keys_are_rejected(example: Project, key: str) -> None:
    message = error_of(example, {"name": "x", key: 1}, "greeter")
    assert repr(key) in message
    assert "'greeter'" in message


def test_missing_required_parameter(example: Project) -> None:
    message = error_of(example, {}, "greeter")
    assert message == "No value given for missing parameters: 'name' (entry point 'greeter')"


def test_missing_parameters_are_all_listed_in_order(tmp_path: Path) -> None:
    project = project_with(tmp_path, "b: int\na: float\nc: {default: 1}\n", "run {a} {b} {c}")
    message = error_of(project, {})
    assert message.startswith("No value given for missing parameters: 'b', 'a'")
    assert "'main'" in message


def test_none_counts_as_not_given(example: Project) -> None:
    assert "'name'" in error_of(example, {"name": None}, "greeter")
    resolved = resolve(example, {"name": "x", "greeting": None, "extra": None}, "greeter")
    assert resolved.command == "python greeter.py hi x"


def test_parameters_none_is_accepted(tmp_path: Path) -> None:
    project = project_with(tmp_path, "a: {default: x}\n", "echo {a}")
    assert resolve(project, None) == ResolvedParameters({"a": "x"}, {"a": "x"}, "echo x")


# --------------------------------------------------------------------------- coercion


@pytest.fixture
def typed(tmp_path: Path) -> Project:
    return project_with(
        tmp_path,
        """\
        alpha: float
        n: int
        flag: bool
        label: str
        """,
        "train {alpha} {n} {flag} {label}",
    )


def typed_values(project: Project, **overrides: object) -> dict[str, object]:
    params: dict[str, object] = {"alpha": 0.5, "n": 3, "flag": True, "label": "x"}
    params.update(overrides)
    return resolve(project, params).values


def test_typed_values_logged_and_command(typed: Project) -> None:
    resolved = resolve(typed, {"alpha": 0.5, "n": 3, "flag": True, "label": 7})
    assert resolved.values == {"alpha": 0.5, "n": 3, "flag": True, "label": "7"}
    assert resolved.logged == {"alpha": "0.5", "n": "3", "flag": "True", "label": "7"}
    assert resolved.command == "train 0.5 3 True 7"


@pytest.mark.parametrize(
    ("given", "expected"),
    [(0.5, 0.5), (2, 2.0), ("1e-05", 1e-05), ("-3.25", -3.25), (" 4 ", 4.0), ("inf", math.inf)],
)
def test_float_accepts_numbers_and_numeric_strings(
    typed: Project, given: object, expected: float
) -> None:
    value = typed_values(typed, alpha=given)["alpha"]
    assert isinstance(value, float)
    assert value == expected


def test_float_accepts_nan(typed: Project) -> None:
    value = typed_values(typed, alpha="nan")["alpha"]
    assert isinstance(value, float)
    assert math.isnan(value)


def test_float_logged_and_rendered_as_given(typed: Project) -> None:
    resolved = resolve(typed, {"alpha": "1e-05", "n": 1, "flag": 0, "label": "x"})
    assert resolved.logged["alpha"] == "1e-05"
    assert resolved.command.startswith("train 1e-05 ")


@pytest.mark.parametrize("given", ["abc", "", "1_000", True, [1.0], "0x10"])
def test_float_rejects_non_numbers(typed: Project, given: object) -> None:
    message = error_of(typed, {"alpha": given, "n": 1, "flag": True, "label": "x"})
    assert message == f"Parameter 'alpha' of entry point 'main' expects a float, got {given!r}"


@pytest.mark.parametrize(("given", "expected"), [(3, 3), ("3", 3), ("-2", -2), ("+7", 7)])
def test_int_accepts_ints_and_integer_strings(typed: Project, given: object, expected: int) -> None:
    value = typed_values(typed, n=given)["n"]
    assert isinstance(value, int)
    assert value == expected


@pytest.mark.parametrize("given", [3.5, "3.5", 3.0, "abc", "", False, "1e3"])
def test_int_rejects_non_integers(typed: Project, given: object) -> None:
    message = error_of(typed, {"alpha": 1, "n": given, "flag": True, "label": "x"})
    assert message == f"Parameter 'n' of entry point 'main' expects an int, got {given!r}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
        ("Yes", True),
        ("no", False),
        (1, True),
        (0, False),
    ],
)
def test_bool_accepts_common_spellings(typed: Project, given: object, expected: bool) -> None:
    assert typed_values(typed, flag=given)["flag"] is expected


def test_bool_renders_what_was_given(typed: Project) -> None:
    resolved = resolve(typed, {"alpha": 1, "n": 1, "flag": "yes", "label": "x"})
    assert resolved.command == "train 1 1 yes x"
    assert resolved.logged["flag"] == "yes"


@pytest.mark.parametrize("given", ["maybe", "", 2, 0.5, "t"])
def test_bool_rejects_other_values(typed: Project, given: object) -> None:
    message = error_of(typed, {"alpha": 1, "n": 1, "flag": given, "label": "x"})
    assert message.startswith("Parameter 'flag' of entry point 'main' expects a bool")
    assert message.endswith(f"got {given!r}")


def test_bad_default_is_named_as_default(tmp_path: Path) -> None:
    project = project_with(tmp_path, "lr: {type: float, default: fast}\n", "run {lr}")
    message = error_of(project, {})
    assert message == (
        "Parameter 'lr' of entry point 'main' expects a float, got 'fast' "
        "(its default in the MLproject)"
    )


def test_defaults_are_coerced_and_logged_as_written(tmp_path: Path) -> None:
    project = project_with(
        tmp_path,
        """\
        lr: {type: float, default: 0.1}
        epochs: {type: integer, default: 10}
        debug: {type: boolean, default: false}
        """,
        "run {lr} {epochs} {debug}",
    )
    resolved = resolve(project, {})
    assert resolved.values == {"lr": 0.1, "epochs": 10, "debug": False}
    assert resolved.logged == {"lr": "0.1", "epochs": "10", "debug": "False"}
    assert resolved.command == "run 0.1 10 False"


def test_unknown_type_is_passed_as_string(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="mystery"):
        project = project_with(tmp_path, "m: mystery\n", "run {m}")
    assert resolve(project, {"m": 3}).values == {"m": "3"}


# --------------------------------------------------------------------------- path and uri


def test_local_path_must_exist_and_becomes_absolute(example: Project, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a\n")
    resolved = resolve(example, {"path": "data.csv"}, "line_count", cwd=tmp_path)
    expected = str(tmp_path / "data.csv")
    assert resolved.values == {"path": expected}
    assert resolved.logged == {"path": "data.csv"}
    assert resolved.command == f"cat {shlex.quote(expected)} | wc -l"


def test_file_uri_path_becomes_local(example: Project, tmp_path: Path) -> None:
    target = tmp_path / "my data.csv"
    target.write_text("a\n")
    resolved = resolve(example, {"path": target.as_uri()}, "line_count")
    assert resolved.values == {"path": str(target)}
    assert resolved.logged == {"path": target.as_uri()}


def test_path_accepts_pathlike(example: Project, tmp_path: Path) -> None:
    resolved = resolve(example, {"path": tmp_path}, "line_count")
    assert resolved.values == {"path": str(tmp_path)}


def test_missing_local_path(example: Project, tmp_path: Path) -> None:
    with pytest.raises(ParameterError) as info:
        resolve(example, {"path": "nope.csv"}, "line_count", cwd=tmp_path)
    assert str(info.value).startswith(
        "Got value nope.csv for parameter path, but no such file or directory was found."
    )
    assert "'line_count'" in str(info.value)


def test_path_exists_callback_and_cwd_are_used(example: Project) -> None:
    seen: list[Path] = []

    def exists(path: Path) -> bool:
        seen.append(path)
        return True

    resolved = resolve(
        example, {"path": "../x/y.csv"}, "line_count", path_exists=exists, cwd=Path("/base/dir")
    )
    assert seen == [Path("/base/x/y.csv")]
    assert resolved.values == {"path": "/base/x/y.csv"}


@pytest.mark.parametrize(
    "uri", ["s3://bucket/key.csv", "https://example.com/data.csv", "runs:/abc123/model.pkl"]
)
def test_remote_path_passes_through(example: Project, uri: str) -> None:
    resolved = resolve(example, {"path": uri}, "line_count", path_exists=lambda _: False)
    assert resolved.values == {"path": uri}
    assert resolved.command == f"cat {shlex.quote(uri)} | wc -l"


def test_path_rejects_non_strings(example: Project) -> None:
    message = error_of(example, {"path": 3}, "line_count")
    assert message == "Parameter 'path' of entry point 'line_count' expects a path, got 3"


@pytest.mark.parametrize("uri", ["file:///tmp/x", "s3://b/k", "runs:/id/model"])
def test_uri_accepts_values_with_a_scheme(example: Project, uri: str) -> None:
    resolved = resolve(example, {"uri": uri}, "download_uri")
    assert resolved.values == {"uri": uri}
    assert resolved.command == f"curl {uri} | wc -l"


@pytest.mark.parametrize("value", ["/tmp/x", "relative/path", ""])
def test_uri_without_scheme_is_rejected(example: Project, value: str) -> None:
    message = error_of(example, {"uri": value}, "download_uri")
    assert message.startswith(f"Expected URI for parameter uri but got {value}")
    assert "'download_uri'" in message


def test_path_and_uri_defaults_are_validated(tmp_path: Path) -> None:
    project = project_with(tmp_path, "u: {type: uri, default: not-a-uri}\n", "run {u}")
    message = error_of(project, {})
    assert "Expected URI for parameter u but got not-a-uri" in message
    assert "default" in message


# --------------------------------------------------------------------------- command template


def test_undeclared_placeholder_is_a_parameter_error(tmp_path: Path) -> None:
    project = project_with(tmp_path, "a: {default: 1}\n", "run {a} {b}")
    message = error_of(project, {"b": 2})
    assert "{b}" in message
    assert "'main'" in message


@pytest.mark.parametrize("placeholder", ["{}", "{0}", "{a.real}", "{a[0]}"])
def test_positional_and_attribute_placeholders_are_rejected(
    tmp_path: Path, placeholder: str
) -> None:
    project = project_with(tmp_path, "a: {default: 1}\n", f"run {placeholder}")
    assert placeholder in error_of(project, {})


def test_literal_braces(tmp_path: Path) -> None:
    project = project_with(tmp_path, "a: {default: x y}\n", "awk '{{print $1}}' {a}")
    assert resolve(project, {}).command == "awk '{print $1}' 'x y'"


def test_format_spec_applies_to_quoted_value(tmp_path: Path) -> None:
    project = project_with(tmp_path, "a: {default: x}\nw: {type: int, default: 3}\n", "[{a:>{w}}]")
    assert resolve(project, {}).command == "[  x]"


def test_malformed_template_is_an_mlproject_error(tmp_path: Path) -> None:
    project = Project(
        directory=tmp_path,
        name=None,
        env_type=load_project(tmp_path).env_type,
        env_config_path=None,
        docker_env=None,
        entry_points={},
        mlproject_path=tmp_path / "MLproject",
    )
    entry_point = EntryPoint("main", {"a": Parameter("a", "string", "x", "string")}, "run {a")
    with pytest.raises(MLprojectError, match="malformed command"):
        resolve_parameters(project, entry_point, {})


def test_bad_format_spec_is_an_mlproject_error(tmp_path: Path) -> None:
    project = project_with(tmp_path, "a: {type: int, default: 1}\n", "run {a:d}")
    with pytest.raises(MLprojectError, match="malformed command"):
        resolve(project, {})


def test_script_entry_point_takes_extras(tmp_path: Path) -> None:
    project = load_project(tmp_path)
    resolved = resolve(project, {"alpha": 0.1, "name": "a b"}, "train.py")
    assert resolved.command == "python train.py --alpha 0.1 --name 'a b'"
    assert resolved.logged == {"alpha": "0.1", "name": "a b"}


@pytest.mark.parametrize("kind", ["string", "float", "int", "bool", "uri"])
@pytest.mark.parametrize("value", [10**5000, "9" * 5000], ids=["int", "digits"])
def test_huge_numbers_are_parameter_errors(tmp_path: Path, kind: str, value: object) -> None:
    project = project_with(tmp_path, f"a: {kind}\n", "run {a}")
    if kind in ("string", "float") and isinstance(value, str):
        # A long digit string is a fine string, and a float (inf).
        assert resolve(project, {"a": value}).logged == {"a": value}
        return
    with pytest.raises(ParameterError) as caught:
        resolve(project, {"a": value})
    assert len(str(caught.value)) < 1000


@pytest.mark.parametrize("params", [{"a": "x\0y"}, {"a": "x", "extra": "\0"}, {"a": "\ud800"}])
def test_values_no_command_line_can_carry_are_parameter_errors(
    tmp_path: Path, params: dict[str, object]
) -> None:
    project = project_with(tmp_path, "a: string\n", "run {a}")
    with pytest.raises(ParameterError, match="no command line can carry"):
        resolve(project, params)


@pytest.mark.parametrize("conversion", ["r", "a"])
def test_repr_conversion_keeps_the_value_in_one_shell_word(tmp_path: Path, conversion: str) -> None:
    project = project_with(tmp_path, "a: string\n", f"run {{a!{conversion}}} end")
    value = "x'; touch pwned; '"
    command = resolve(project, {"a": value}).command
    assert shlex.split(command) == ["run", repr(value), "end"]
