"""Shared fixtures: anyio on asyncio in debug mode, blocking-call detection, isolated stores."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from . import mlflow_plugin_wheel
from .docker_daemon import TEST_LABEL, DockerDaemon, DockerUnavailable, Registry
from .mlflow_server import MlflowServer
from .support import unavailable

#: Session services that one test process must own: tests using them run in one xdist
#: worker each (``--dist loadgroup``), so no two workers install, start or stop them.
_SERVICE_GROUPS = {
    "slurm": "slurm",
    "docker_daemon": "docker",
    "docker_registry": "docker",
    "chromium": "chromium",
    "mlflow_test_plugin": "mlflow-plugin",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (long runs, real installs); CI does",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--run-slow"):
        # Deselected, not skipped: the summary says how many, and nothing is counted
        # as passed that did not run.
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
    for item in items:
        groups = {
            _SERVICE_GROUPS[f] for f in getattr(item, "fixturenames", ()) if f in _SERVICE_GROUPS
        }
        if groups:
            item.add_marker(pytest.mark.xdist_group("+".join(sorted(groups))))


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"debug": True})


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail any test whose event loop makes a blocking call (file I/O, sleep, subprocess).

    Sync tests run no loop and are unaffected; tests marked ``allow_blocking`` opt out
    (for example a test that reads records back with the synchronous mlflow client).
    """
    if request.node.get_closest_marker("allow_blocking"):
        yield None
        return
    with blockbuster_ctx() as bb:
        yield bb


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep every test away from the user's ~/.cache, ./mlruns and MLflow settings."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AIOPROJ_CACHE_DIR", str(cache))
    for var in list(os.environ):
        if var.startswith("MLFLOW_"):
            monkeypatch.delenv(var)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh file store for one test, set as MLFLOW_TRACKING_URI."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` (sqlite), started once for the whole session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_test_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test MLflow backend plugin, pip-installed for the session; its backend name.

    A real wheel with an ``mlflow.project_backend`` entry point (tests/mlflow_plugin/),
    installed into the environment that runs the tests and uninstalled at the end.
    """
    mlflow_plugin_wheel.install(tmp_path_factory.mktemp("mlflow-plugin"))
    try:
        yield mlflow_plugin_wheel.PLUGIN_NAME
    finally:
        mlflow_plugin_wheel.uninstall()


_DOCKER_TIMINGS = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def docker_daemon(request: pytest.FixtureRequest) -> Iterator[DockerDaemon]:
    """A real Docker daemon (installed and started if needed) with the test images.

    See tests/docker_daemon.py. The first session on a fresh machine installs docker.io
    and builds the images (minutes); later sessions find them. Tests using it mark their
    timeout ``func_only``, so this set-up is not counted in the first test's timeout.
    """
    start = time.monotonic()
    try:
        daemon = DockerDaemon.start()
    except DockerUnavailable as exc:
        unavailable(f"No Docker daemon: {exc}")
    from . import docker_daemon as module

    timings = {
        "install": module.apt_seconds,
        "daemon": time.monotonic() - module.apt_seconds - start,
    }
    try:
        timings.update(daemon.ensure_images())
    except DockerUnavailable as exc:
        daemon.close()
        unavailable(f"The test images could not be made: {exc}")
    except BaseException:
        daemon.close()
        raise
    request.config.stash[_DOCKER_TIMINGS] = timings
    try:
        yield daemon
    finally:
        try:
            daemon.remove_containers(TEST_LABEL)  # what a failed test may have left
        finally:
            daemon.close()


@pytest.fixture(scope="session")
def docker_registry(
    docker_daemon: DockerDaemon, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """Debian's docker-registry on 127.0.0.1, for the session."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    try:
        registry.start()
    except DockerUnavailable as exc:
        unavailable(f"No container registry: {exc}")
    try:
        yield registry
    finally:
        registry.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what the Docker fixture cost this session (installs, daemon, images)."""
    timings = terminalreporter.config.stash.get(_DOCKER_TIMINGS, None)
    if timings:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
        terminalreporter.write_line(f"docker fixture: {parts}")
