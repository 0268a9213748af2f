"""Runs of projects fetched from git over smart HTTP (a real server on 127.0.0.1)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus

from .gitserver import GitServer
from .support import all_runs, make_project, read_run

pytestmark = pytest.mark.anyio

MLPROJECT = """
entry_points:
  main:
    parameters:
      alpha: float
    command: "echo version=$(cat VERSION) alpha={alpha}"
"""


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[GitServer, dict[str, str]]]:
    """A repo with the project in ``sub/``: v1.2 tagged, then a newer commit on main."""
    root = tmp_path / "served"
    repo = root / "repo.git"
    make_project(repo / "sub", MLPROJECT, {"VERSION": "1.2\n"})
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1.2")
    _git(repo, "tag", "v1.2")
    old = _git(repo, "rev-parse", "HEAD")
    (repo / "sub" / "VERSION").write_text("2.0\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "v2")
    new = _git(repo, "rev-parse", "HEAD")
    with GitServer(root) as server:
        yield server, {"v1.2": old, "main": new}


async def test_run_at_tag_from_git_subdirectory(
    served: tuple[GitServer, dict[str, str]], tracking_uri: str
) -> None:
    server, commits = served
    uri = server.url("repo.git") + "#sub"
    async with Runner(echo="off") as runner:
        run = await runner.run(uri, version="v1.2", parameters={"alpha": 0.5}, env_manager="local")
    assert [line async for line in run.logs()] == ["version=1.2 alpha=0.5\n"]
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.source.name"] == uri
    assert tags["mlflow.source.git.commit"] == commits["v1.2"]
    assert tags["mlflow.source.git.repoURL"] == server.url("repo.git")
    assert "mlflow.source.git.branch" not in tags  # a tag, not a branch


async def test_branch_version_sets_branch_tag(
    served: tuple[GitServer, dict[str, str]], tracking_uri: str
) -> None:
    server, commits = served
    async with Runner(echo="off") as runner:
        run = await runner.run(
            server.url("repo.git") + "#sub",
            version="main",
            parameters={"alpha": 1},
            env_manager="local",
        )
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.commit"] == commits["main"]


async def test_gathered_runs_of_one_repo_fetch_it_once(
    served: tuple[GitServer, dict[str, str]], tracking_uri: str
) -> None:
    server, _ = served
    uri = server.url("repo.git") + "#sub"
    async with Runner(echo="off") as runner, anyio.create_task_group() as tg:
        for a in range(20):
            tg.start_soon(
                lambda a=a: runner.run(
                    uri, version="v1.2", parameters={"alpha": a}, env_manager="local"
                )
            )
    assert server.fetches() == 1
    assert {r.info.status for r in await all_runs(tracking_uri)} == {"FINISHED"}


async def test_bad_version_creates_no_run(
    served: tuple[GitServer, dict[str, str]], tracking_uri: str
) -> None:
    server, _ = served
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.SourceError, match="Unable to checkout version 'nope'"):
            await runner.run(
                server.url("repo.git") + "#sub",
                version="nope",
                parameters={"alpha": 1},
                env_manager="local",
            )
    assert await all_runs(tracking_uri) == []


async def test_module_level_run_from_git(
    served: tuple[GitServer, dict[str, str]], tracking_uri: str
) -> None:
    server, _ = served
    run = await aioproj.run(
        server.url("repo.git") + "#sub",
        version="v1.2",
        parameters={"alpha": 0.5},
        env_manager="local",
    )
    assert await run is RunStatus.FINISHED
