"""MLproject discovery, parsing and schema validation (aioproj.project.spec)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from aioproj.errors import EntryPointError, ExecutionError, MLprojectError, SourceError
from aioproj.project import (
    DockerEnv,
    EntryPoint,
    EnvType,
    Parameter,
    Project,
    load_project,
    parse_project,
)

EXAMPLE_MLPROJECT = """\
conda_env: conda.yaml

entry_points:
  main:
    command: "echo 'Main entry point'"
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
  sleep:
    parameters:
      duration: int
    command: "sleep {duration}"
  test_tracking:
    parameters:
      use_start_run: bool
    command: "python tracking_test.py {use_start_run}"
  check_conda_env:
    parameters:
      conda_env_name: string
    command: "python check_conda_env.py {conda_env_name}"
  test_artifact_path:
    parameters:
      model: {type: path}
    command: "echo success"
"""

EXAMPLE_CONDA_YAML = """\
name: tutorial
channels:
  - defaults
dependencies:
  - python=3.10
  - pip:
      - psutil
"""


def write_project(directory: Path, mlproject: str | None, **files: str) -> Path:
    """Write an MLproject (unless None) and extra files; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    if mlproject is not None:
        (directory / "MLproject").write_text(textwrap.dedent(mlproject))
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def load_error(directory: Path) -> MLprojectError:
    with pytest.raises(MLprojectError) as info:
        load_project(directory)
    return info.value


# --------------------------------------------------------------------------- discovery


def test_example_project_entry_points_types_and_defaults(tmp_path: Path) -> None:
    write_project(tmp_path, EXAMPLE_MLPROJECT, **{"conda.yaml": EXAMPLE_CONDA_YAML})
    project = load_project(tmp_path)
    assert project.directory == tmp_path.resolve()
    assert project.name is None
    assert project.env_type is EnvType.CONDA
    assert project.env_config_path == tmp_path / "conda.yaml"
    assert project.docker_env is None
    assert project.mlproject_path == tmp_path / "MLproject"
    assert list(project.entry_points) == [
        "main",
        "greeter",
        "line_count",
        "download_uri",
        "sleep",
        "test_tracking",
        "check_conda_env",
        "test_artifact_path",
    ]
    greeter = project.get_entry_point("greeter")
    assert greeter.command == "python greeter.py {greeting} {name}"
    assert list(greeter.parameters) == ["greeting", "name"]
    assert greeter.parameters["greeting"] == Parameter("greeting", "string", "hi", "string")
    assert greeter.parameters["name"] == Parameter("name", "string", None, "string")
    assert project.entry_points["sleep"].parameters["duration"].type == "int"
    assert project.entry_points["test_tracking"].parameters["use_start_run"].type == "bool"
    assert project.entry_points["line_count"].parameters["path"].type == "path"
    assert project.entry_points["download_uri"].parameters["uri"].type == "uri"
    model = project.entry_points["test_artifact_path"].parameters["model"]
    assert (model.type, model.default) == ("path", None)
    assert project.get_entry_point("main") == EntryPoint("main", {}, "echo 'Main entry point'")


def test_relative_directory_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_project(tmp_path / "proj", "entry_points: {}\n")
    monkeypatch.chdir(tmp_path)
    project = load_project(Path("proj"))
    assert project.directory == tmp_path / "proj"
    assert project.directory.is_absolute()


@pytest.mark.parametrize("file_name", ["mlproject", "MLProject", "MLPROJECT"])
def test_mlproject_name_is_case_insensitive(tmp_path: Path, file_name: str) -> None:
    (tmp_path / file_name).write_text("name: lower\nconda_env: env/custom.yaml\n")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "custom.yaml").write_text(EXAMPLE_CONDA_YAML)
    project = load_project(tmp_path)
    assert project.mlproject_path == tmp_path / file_name
    assert project.name == "lower"
    assert project.env_type is EnvType.CONDA
    assert project.env_config_path == tmp_path / "env" / "custom.yaml"


def test_mlproject_yaml_extension_is_not_an_mlproject(tmp_path: Path) -> None:
    (tmp_path / "MLproject.yaml").write_text("name: nope\n")
    project = load_project(tmp_path)
    assert project.mlproject_path is None
    assert project.name is None


def test_directory_named_mlproject_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "mlproject").mkdir()
    assert load_project(tmp_path).mlproject_path is None


def test_no_mlproject_gives_defaults(tmp_path: Path) -> None:
    project = load_project(tmp_path)
    assert project == Project(
        directory=tmp_path,
        name=None,
        env_type=EnvType.PYTHON,
        env_config_path=None,
        docker_env=None,
        entry_points={},
        mlproject_path=None,
    )


def test_no_mlproject_with_conda_yaml_is_conda(tmp_path: Path) -> None:
    write_project(tmp_path, None, **{"conda.yaml": EXAMPLE_CONDA_YAML})
    project = load_project(tmp_path)
    assert project.env_type is EnvType.CONDA
    assert project.env_config_path == tmp_path / "conda.yaml"


def test_unknown_top_level_keys_are_ignored_and_conda_yaml_is_found(tmp_path: Path) -> None:
    write_project(tmp_path, "key: value\n", **{"conda.yaml": EXAMPLE_CONDA_YAML})
    project = load_project(tmp_path)
    assert project.env_type is EnvType.CONDA
    assert project.env_config_path == tmp_path / "conda.yaml"
    assert project.entry_points == {}


def test_python_env_yaml_wins_over_conda_yaml_by_convention(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        "name: virtualenv-example\nentry_points:\n  main:\n    command: python entrypoint.py\n",
        **{"python_env.yaml": "python: '3.10'\n", "conda.yaml": EXAMPLE_CONDA_YAML},
    )
    project = load_project(tmp_path)
    assert project.env_type is EnvType.PYTHON
    assert project.env_config_path == tmp_path / "python_env.yaml"


def test_python_env_project(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        """\
        name: virtualenv-example
        python_env: python_env.yaml
        entry_points:
          main:
            command: 'python entrypoint.py'
          test:
            command: 'python entrypoint.py --test'
        """,
        **{"python_env.yaml": "python: '3.10.19'\n"},
    )
    project = load_project(tmp_path)
    assert project.name == "virtualenv-example"
    assert project.env_type is EnvType.PYTHON
    assert project.env_config_path == tmp_path / "python_env.yaml"
    assert project.get_entry_point("test").command == "python entrypoint.py --test"


def test_missing_python_env_file(tmp_path: Path) -> None:
    write_project(tmp_path, "python_env: missing.yaml\n")
    error = load_error(tmp_path)
    expected = tmp_path / "missing.yaml"
    assert f"Project specified python_env file {expected}, but no such file was found." in str(
        error
    )
    assert error.line == 1


def test_missing_conda_env_file(tmp_path: Path) -> None:
    write_project(tmp_path, "name: x\nconda_env: env.yaml\n")
    error = load_error(tmp_path)
    assert "Project specified conda environment file" in str(error)
    assert "but no such file was found." in str(error)
    assert error.line == 2


def test_load_project_on_missing_directory_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot be read"):
        load_project(tmp_path / "absent")


# --------------------------------------------------------------------------- environments


def test_multiple_environment_fields(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        "conda_env: conda.yaml\ndocker_env:\n  image: x\n",
        **{"conda.yaml": EXAMPLE_CONDA_YAML},
    )
    error = load_error(tmp_path)
    assert isinstance(error, ExecutionError)
    assert "Project cannot contain multiple environment fields" in str(error)
    assert "'conda_env'" in str(error)
    assert "'docker_env'" in str(error)


def test_docker_project(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        """\
        name: docker-example

        docker_env:
          image:  mlflow-docker-example

        entry_points:
          main:
            command: "echo 'Main entry point'"
        """,
        **{"conda.yaml": EXAMPLE_CONDA_YAML},
    )
    project = load_project(tmp_path)
    assert project.name == "docker-example"
    assert project.env_type is EnvType.DOCKER
    assert project.env_config_path is None
    assert project.docker_env == DockerEnv(image="mlflow-docker-example")


def test_docker_env_volumes_and_environment(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        """\
        docker_env:
          image: python:3.11
          volumes: ["/data:/data", "/tmp:/scratch"]
          environment: [["NEW_VAR", "value"], "COPIED", ["PORT", 8080]]
        """,
    )
    docker_env = load_project(tmp_path).docker_env
    assert docker_env == DockerEnv(
        image="python:3.11",
        volumes=("/data:/data", "/tmp:/scratch"),
        environment=(("NEW_VAR", "value"), "COPIED", ("PORT", "8080")),
    )


@pytest.mark.parametrize("docker_env", ["docker_env:\n  volumes: []\n", "docker_env: {}\n"])
def test_docker_env_without_image(tmp_path: Path, docker_env: str) -> None:
    write_project(tmp_path, docker_env)
    error = load_error(tmp_path)
    assert (
        "Project configuration (MLproject file) was invalid: Docker environment specified "
        "but no image attribute found."
    ) in str(error)


def test_docker_env_that_is_not_a_mapping(tmp_path: Path) -> None:
    write_project(tmp_path, "docker_env: python:3.11\n")
    error = load_error(tmp_path)
    assert "docker_env: must be a mapping" in str(error)
    assert error.line == 1


@pytest.mark.parametrize("volumes", ["/data:/data", "[1, 2]", "[[a, b]]"])
def test_docker_volumes_must_be_a_list_of_strings(tmp_path: Path, volumes: str) -> None:
    write_project(tmp_path, f"docker_env:\n  image: x\n  volumes: {volumes}\n")
    error = load_error(tmp_path)
    assert "Docker volumes must be a list of strings" in str(error)
    assert "docker_env.volumes" in str(error)
    assert error.line == 3


@pytest.mark.parametrize("environment", ["NAME", "[[a, b, c]]", "[[1, b]]", "[{a: b}]"])
def test_docker_environment_items_must_be_names_or_pairs(tmp_path: Path, environment: str) -> None:
    write_project(tmp_path, f"docker_env:\n  image: x\n  environment: {environment}\n")
    error = load_error(tmp_path)
    assert "environment must be a list containing either strings" in str(error)
    assert error.line == 3


# --------------------------------------------------------------------------- YAML and schema


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write_project(tmp_path, "name: x\nentry_points:\n  main:\n    command: [unclosed\n")
    error = load_error(tmp_path)
    assert error.path == str(tmp_path / "MLproject")
    assert error.line is not None
    assert error.line >= 4
    assert str(error).startswith(f"{tmp_path / 'MLproject'}:{error.line}: invalid YAML")


def test_yaml_tab_error_line(tmp_path: Path) -> None:
    write_project(tmp_path, "name: x\nentry_points:\n\tmain: {}\n")
    error = load_error(tmp_path)
    assert error.line == 3


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_mlproject(tmp_path: Path, text: str) -> None:
    (tmp_path / "MLproject").write_text(text)
    error = load_error(tmp_path)
    assert "empty" in str(error)
    assert error.path == str(tmp_path / "MLproject")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_mlproject_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    (tmp_path / "MLproject").write_text(text)
    error = load_error(tmp_path)
    assert "must be a mapping" in str(error)
    assert str(tmp_path / "MLproject") in str(error)


@pytest.mark.parametrize(
    ("text", "key_path", "line"),
    [
        ("name: x\nentry_points: [main]\n", "entry_points", 2),
        ("entry_points:\n  main: python x.py\n", "entry_points.main", 2),
        ("entry_points:\n  main:\n    parameters: {}\n", "entry_points.main", 2),
        ("entry_points:\n  main:\n    command: 42\n", "entry_points.main.command", 3),
        (
            "entry_points:\n  main:\n    command: x\n    parameters: [a, b]\n",
            "entry_points.main.parameters",
            4,
        ),
        (
            "entry_points:\n  main:\n    command: x\n    parameters:\n      alpha: 1\n",
            "entry_points.main.parameters.alpha",
            5,
        ),
        (
            "entry_points:\n  main:\n    command: x\n    parameters:\n"
            "      beta: float\n      alpha: [float]\n",
            "entry_points.main.parameters.alpha",
            6,
        ),
        (
            "entry_points:\n  main:\n    command: x\n    parameters:\n"
            "      alpha: {type: float, dflt: 1}\n",
            "entry_points.main.parameters.alpha",
            5,
        ),
        (
            "entry_points:\n  main:\n    command: x\n    parameters:\n"
            "      alpha:\n        type: [float]\n",
            "entry_points.main.parameters.alpha.type",
            6,
        ),
        (
            "entry_points:\n  main:\n    command: x\n    parameters:\n"
            "      alpha:\n        default: [1, 2]\n",
            "entry_points.main.parameters.alpha.default",
            6,
        ),
        ("name: [a]\n", "name", 1),
        ("python_env: 3\n", "python_env", 1),
        ("docker_env:\n  image: 3\n", "docker_env.image", 2),
    ],
)
def test_schema_errors_name_key_and_line(
    tmp_path: Path, text: str, key_path: str, line: int
) -> None:
    write_project(tmp_path, text)
    error = load_error(tmp_path)
    assert error.path == str(tmp_path / "MLproject")
    assert error.line == line
    assert f"{tmp_path / 'MLproject'}:{line}: {key_path}:" in str(error)


def test_unknown_parameter_key_is_named(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        "entry_points:\n  main:\n    command: x\n    parameters:\n      a: {typo: int}\n",
    )
    assert "'typo'" in str(load_error(tmp_path))


def test_malformed_command_template_is_an_mlproject_error(tmp_path: Path) -> None:
    write_project(tmp_path, "entry_points:\n  main:\n    command: 'echo {alpha'\n")
    error = load_error(tmp_path)
    assert "entry_points.main.command" in str(error)
    assert error.line == 3


def test_unknown_conversion_in_command_is_an_mlproject_error(tmp_path: Path) -> None:
    write_project(tmp_path, "entry_points:\n  main:\n    command: 'echo {alpha!x}'\n")
    assert "entry_points.main.command" in str(load_error(tmp_path))


def test_empty_sections_are_allowed(tmp_path: Path) -> None:
    write_project(tmp_path, "name:\nentry_points:\n  main:\n    command: go\n    parameters:\n")
    project = load_project(tmp_path)
    assert project.name is None
    assert project.entry_points["main"].parameters == {}


def test_non_string_names_are_stringified(tmp_path: Path) -> None:
    write_project(
        tmp_path, "name: 7\nentry_points:\n  1:\n    command: go {2}\n    parameters: {2: int}\n"
    )
    project = load_project(tmp_path)
    assert project.name == "7"
    assert project.get_entry_point("1").parameters["2"].type == "int"


# --------------------------------------------------------------------------- parameter types


@pytest.mark.parametrize(
    ("declared", "normalised"),
    [
        ("string", "string"),
        ("str", "string"),
        ("float", "float"),
        ("int", "int"),
        ("integer", "int"),
        ("bool", "bool"),
        ("boolean", "bool"),
        ("path", "path"),
        ("uri", "uri"),
        ("Float", "float"),
    ],
)
def test_type_names_are_normalised(tmp_path: Path, declared: str, normalised: str) -> None:
    write_project(
        tmp_path, f"entry_points:\n  main:\n    command: x\n    parameters:\n      p: {declared}\n"
    )
    parameter = load_project(tmp_path).entry_points["main"].parameters["p"]
    assert parameter == Parameter("p", normalised, None, declared)


def test_long_syntax_defaults_type_to_string_and_stringifies_default(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        """\
        entry_points:
          main:
            command: x
            parameters:
              a: {default: 3}
              b: {type: float, default: 0.1}
              c: {type: bool, default: true}
              d: {type: int, default: null}
        """,
    )
    parameters = load_project(tmp_path).entry_points["main"].parameters
    assert parameters["a"] == Parameter("a", "string", "3", "string")
    assert parameters["b"] == Parameter("b", "float", "0.1", "float")
    assert parameters["c"] == Parameter("c", "bool", "True", "bool")
    assert parameters["d"].default is None


def test_unknown_type_warns_and_is_a_string(tmp_path: Path) -> None:
    write_project(
        tmp_path,
        "entry_points:\n  train:\n    command: x\n    parameters:\n      p: mystery\n",
    )
    with pytest.warns(UserWarning, match=r"'p' of entry point 'train' has unknown type 'mystery'"):
        project = load_project(tmp_path)
    assert project.entry_points["train"].parameters["p"] == Parameter(
        "p", "string", None, "mystery"
    )


# --------------------------------------------------------------------------- scripts


def test_script_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_project(tmp_path, EXAMPLE_MLPROJECT, **{"conda.yaml": EXAMPLE_CONDA_YAML})
    project = load_project(tmp_path)
    monkeypatch.setenv("SHELL", "/bin/zsh")
    assert project.get_entry_point("my_script.py").command == "python my_script.py"
    assert project.get_entry_point("my_script.sh").command == "/bin/zsh my_script.sh"
    assert project.get_entry_point("my script.py").command == "python 'my script.py'"
    assert project.get_entry_point("my_script.py").parameters == {}


def test_shell_script_defaults_to_bash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHELL", raising=False)
    assert load_project(tmp_path).get_entry_point("run.sh").command == "bash run.sh"


@pytest.mark.parametrize("name", ["my_script.scala", "train", "model.r"])
def test_unsupported_script_is_rejected(tmp_path: Path, name: str) -> None:
    write_project(tmp_path, "entry_points:\n  main:\n    command: go\n")
    with pytest.raises(EntryPointError) as info:
        load_project(tmp_path).get_entry_point(name)
    assert str(info.value) == (
        f"Could not find {name} among entry points ['main'] or interpret {name} as a "
        "runnable script. Supported script file extensions: ['.py', '.sh', '.R']"
    )


# --------------------------------------------------------------------------- parse_project


def test_parse_project_is_pure() -> None:
    seen: list[Path] = []

    def file_exists(path: Path) -> bool:
        seen.append(path)
        return path.name == "env.yaml"

    project = parse_project(
        "python_env: env.yaml\nentry_points:\n  main:\n    command: go\n",
        directory=Path("/nowhere/proj"),
        mlproject_path=Path("/nowhere/proj/MLproject"),
        file_exists=file_exists,
    )
    assert project.env_config_path == Path("/nowhere/proj/env.yaml")
    assert seen == [Path("/nowhere/proj/env.yaml")]


def test_parse_project_without_text_uses_convention() -> None:
    project = parse_project(
        None,
        directory=Path("/nowhere"),
        mlproject_path=None,
        file_exists=lambda path: path.name == "conda.yaml",
    )
    assert project.env_type is EnvType.CONDA
    assert project.env_config_path == Path("/nowhere/conda.yaml")
    assert project.mlproject_path is None
