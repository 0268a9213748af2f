"""Helpers for tests: projects on disk, reading runs back with MLflow, process checks."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest

PYTHON = sys.executable

#: ``AIOPROJ_HYPOTHESIS=thorough`` runs the property tests randomized, with
#: ``AIOPROJ_HYPOTHESIS_SCALE`` (default 20) times their examples, keeping what fails in
#: ``.hypothesis/`` to replay it (see README, Reliability). Otherwise they are
#: derandomized, so CI sees the same inputs every run.
THOROUGH = os.environ.get("AIOPROJ_HYPOTHESIS") == "thorough"


def property_settings(examples: int) -> Any:
    """Hypothesis settings for a property test with ``examples`` examples in CI."""
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    scale = int(os.environ.get("AIOPROJ_HYPOTHESIS_SCALE", "20")) if THOROUGH else 1
    return settings(
        max_examples=examples * scale,
        deadline=None,
        derandomize=not THOROUGH,
        database=DirectoryBasedExampleDatabase(".hypothesis/examples") if THOROUGH else None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def make_project(root: Path, mlproject: str | None, files: dict[str, str] | None = None) -> Path:
    """Write a project directory: an MLproject (dedented) and other files."""
    root.mkdir(parents=True, exist_ok=True)
    if mlproject is not None:
        (root / "MLproject").write_text(textwrap.dedent(mlproject))
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def mlflow_client(tracking_uri: str) -> Any:
    """A real MlflowClient on our file store (MLflow 3 wants the file store opted into)."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _read_run(tracking_uri: str, run_id: str) -> Any:
    return mlflow_client(tracking_uri).get_run(run_id)


async def read_run(tracking_uri: str, run_id: str) -> Any:
    """Read a run back with MLflow's own client (in a worker thread)."""
    return await anyio.to_thread.run_sync(_read_run, tracking_uri, run_id)


def _all_runs(tracking_uri: str) -> list[Any]:
    client = mlflow_client(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    return list(client.search_runs([e.experiment_id for e in experiments]))


async def all_runs(tracking_uri: str) -> list[Any]:
    """Every run in the store, read with MLflow's client."""
    return await anyio.to_thread.run_sync(_all_runs, tracking_uri)


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie of a reparented grandchild counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def pids_in(path: Path) -> list[int]:
    """The pids a test project wrote into ``path``, one per line."""
    return [int(line) for line in path.read_text().split()]


async def wait_for_file(path: Path, *, lines: int = 1, limit: float = 10.0) -> None:
    """Wait until a test project has written ``lines`` lines into ``path``."""
    with anyio.fail_after(limit):
        while True:
            if await anyio.Path(path).exists():
                text = await anyio.Path(path).read_text()
                if len(text.split()) >= lines:
                    return
            await anyio.sleep(0.02)


async def amake_project(
    root: Path, mlproject: str | None, files: dict[str, str] | None = None
) -> Path:
    """:func:`make_project` from an async test (off the event loop)."""
    return await anyio.to_thread.run_sync(make_project, root, mlproject, files)


def _survivors(path: Path) -> list[int]:
    return [pid for pid in pids_in(path) if not process_gone(pid)]


async def survivors(path: Path) -> list[int]:
    """The pids listed in ``path`` that still run (read off the event loop)."""
    return await anyio.to_thread.run_sync(_survivors, path)


def _journal_runs() -> list[Any]:
    from aioproj.journal._records import fold, parse_lines

    folder = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "journal"
    if not folder.is_dir():
        return []
    runs: list[Any] = []
    for path in sorted(folder.glob("*.log")):
        _, found = fold(parse_lines(path.read_bytes()))
        runs.extend(run for run in found.values() if not run.done)
    return runs


async def journal_runs() -> list[Any]:
    """The runs the run journals (of this test's cache) describe as unfinished."""
    return await anyio.to_thread.run_sync(_journal_runs)


async def until(check: Any, *, limit: float = 30.0, interval: float = 0.01) -> None:
    """Wait until ``check()`` (sync, run in a worker thread) is true, polling.

    For conditions no event announces: another process's files or exit.
    """
    with anyio.fail_after(limit):
        while not await anyio.to_thread.run_sync(check):  # noqa: ASYNC110
            await anyio.sleep(interval)


def download_artifact(client: Any, run_id: str, path: str) -> bytes:
    """The bytes of a run's artifact through MLflow's client, from a temporary directory
    that is removed (MLflow's ``download_artifacts`` without a destination leaves one in
    the system temp dir for good)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aioproj-test-artifact-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def unavailable(reason: str) -> NoReturn:
    """Skip, with the reason, where a system service cannot be had; fail in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a service the tests need must be available)")
    pytest.skip(reason)
