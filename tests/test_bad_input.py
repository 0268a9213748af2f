"""Bad input gets a clear error, early, and leaves nothing half made."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Runner

from .support import all_runs, amake_project, make_project

pytestmark = pytest.mark.anyio

GOOD = """
entry_points:
  main:
    parameters:
      alpha: float
      n: {type: int, default: 3}
    command: "echo {alpha} {n}"
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return make_project(tmp_path / "good", GOOD)


async def _fails(
    error: type[Exception], match: str, tracking_uri: str, uri: str, **kwargs: Any
) -> None:
    kwargs.setdefault("env_manager", "local")
    async with Runner(echo="off") as runner:
        with pytest.raises(error, match=match):
            await runner.run(uri, **kwargs)
        assert runner.active_runs == frozenset()
    assert await all_runs(tracking_uri) == []


async def test_missing_parameter(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.ParameterError,
        "No value given for missing parameters: 'alpha'",
        tracking_uri,
        str(good),
    )


async def test_ill_typed_parameter_names_everything(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.ParameterError,
        r"'n'.*'main'.*int.*'many'|'n'.*int.*'many'.*'main'",
        tracking_uri,
        str(good),
        parameters={"alpha": 1, "n": "many"},
    )


async def test_unknown_entry_point(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.EntryPointError,
        "Could not find nope among entry points",
        tracking_uri,
        str(good),
        entry_point="nope",
        parameters={"alpha": 1},
    )


async def test_empty_mlproject(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(tmp_path / "empty", "")
    await _fails(aioproj.MLprojectError, "MLproject", tracking_uri, str(project))


async def test_malformed_yaml_names_file_and_line(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(
        tmp_path / "bad", "entry_points:\n  main:\n    command: [unclosed\n"
    )
    await _fails(aioproj.MLprojectError, r"MLproject:\d+", tracking_uri, str(project))


async def test_missing_local_path(tmp_path: Path, tracking_uri: str) -> None:
    await _fails(aioproj.SourceError, "does not exist", tracking_uri, str(tmp_path / "nowhere"))


async def test_dot_in_subdirectory(good: Path, tracking_uri: str) -> None:
    await _fails(aioproj.SourceError, "'.' is not allowed", tracking_uri, f"{good}#../x")


async def test_version_on_a_plain_directory(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.SourceError,
        "only supported for Git project URIs",
        tracking_uri,
        str(good),
        version="v1",
        parameters={"alpha": 1},
    )


async def test_unreachable_git_host(tracking_uri: str) -> None:
    await _fails(
        aioproj.SourceError, "127.0.0.1:9", tracking_uri, "http://127.0.0.1:9/org/repo.git"
    )


@pytest.fixture
def evil_zip(tmp_path: Path) -> Path:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("MLproject", GOOD)
        zf.writestr("../escaped.txt", "gotcha")
    return archive


async def test_zip_slip_is_rejected(evil_zip: Path, tmp_path: Path, tracking_uri: str) -> None:
    await _fails(aioproj.SourceError, r"\.\./escaped\.txt", tracking_uri, str(evil_zip))
    assert not await anyio.Path(tmp_path / "escaped.txt").exists()


async def test_unknown_backend(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.ExecutionError,
        "Got unsupported execution mode nowhere. Supported values:",
        tracking_uri,
        str(good),
        backend="nowhere",
        parameters={"alpha": 1},
    )


async def test_unknown_env_manager(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.InvalidArgumentError,
        "Invalid value for `env_manager`: 'pipenv'",
        tracking_uri,
        str(good),
        env_manager="pipenv",
        parameters={"alpha": 1},
    )


async def test_both_experiment_options(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.InvalidArgumentError,
        "Specify only one of",
        tracking_uri,
        str(good),
        experiment_name="a",
        experiment_id="1",
        parameters={"alpha": 1},
    )


async def test_unknown_experiment_id(good: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.TrackingError, match="12345"):
            await runner.run(
                str(good), experiment_id="12345", parameters={"alpha": 1}, env_manager="local"
            )
    runs = await all_runs(tracking_uri)
    assert runs == []


async def test_bad_backend_config_json(good: Path, tmp_path: Path, tracking_uri: str) -> None:
    config = tmp_path / "cluster.json"
    await anyio.Path(config).write_text("{not json")
    await _fails(
        aioproj.InvalidArgumentError,
        "Invalid backend config JSON in file",
        tracking_uri,
        str(good),
        backend_config=str(config),
        parameters={"alpha": 1},
    )


async def test_conda_for_a_python_env_project(good: Path, tracking_uri: str) -> None:
    await _fails(
        aioproj.EnvironmentBuildError,
        "python_env project cannot be executed using conda",
        tracking_uri,
        str(good),
        env_manager="conda",
        parameters={"alpha": 1},
    )


async def test_bad_runner_arguments() -> None:
    with pytest.raises(aioproj.InvalidArgumentError, match="max_concurrency"):
        Runner(max_concurrency=0)
    with pytest.raises(aioproj.InvalidArgumentError, match="echo"):
        Runner(echo="loud")  # type: ignore[arg-type]
