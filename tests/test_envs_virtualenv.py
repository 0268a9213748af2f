"""The virtualenv manager: spec parsing and hashing, interpreter lookup, real venv builds,
single-flight and cross-process builds, failures and cancellation leaving nothing behind.

No network is used: dependencies are hand-made wheels installed with ``PIP_NO_INDEX=1``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import textwrap
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj.envs.venv as venv_module
from aioproj import Runner, RunStatus
from aioproj.envs import PreparedEnv, prepare_env, select_env_manager
from aioproj.envs.cache import MARKER_NAME
from aioproj.envs.interpreters import find_interpreter, parse_version_request, version_matches
from aioproj.envs.pyspec import (
    current_python_version,
    load_python_spec,
    parse_conda_env,
    parse_python_env,
    requirement_lines,
    spec_digest,
)
from aioproj.errors import EnvironmentBuildError
from aioproj.project import load_project

pytestmark = pytest.mark.anyio

MLPROJECT = """
name: envdemo
entry_points:
  main:
    command: "python -c 'import os, sys; print(os.environ[\\"VIRTUAL_ENV\\"], sys.prefix)'"
"""
CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"


# --- helpers ---------------------------------------------------------------------------


def make_project(root: Path, mlproject: str, files: dict[str, str] | None = None) -> Path:
    """A project directory with an MLproject and other files (dedented)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "MLproject").write_text(textwrap.dedent(mlproject))
    for name, text in (files or {}).items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def make_wheel(directory: Path, name: str = "tinypkg", version: str = "0.1") -> Path:
    """A minimal valid pure-Python wheel (package, METADATA, WHEEL, RECORD)."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = 42\nNAME = {name!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: aioproj-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},sha256={_b64_sha256(text)},{len(text.encode())}" for path, text in files.items()
    ]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def _b64_sha256(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def wheel_project(root: Path, python_env: str | None = None) -> Path:
    """A python_env project whose requirements.txt installs a local wheel."""
    make_wheel(root / "dist")
    env = python_env or f'python: "{CURRENT}"\ndependencies:\n  - -r requirements.txt\n'
    return make_project(
        root,
        MLPROJECT,
        {"python_env.yaml": env, "requirements.txt": "./dist/tinypkg-0.1-py3-none-any.whl\n"},
    )


async def run_in_env(env: PreparedEnv, command: str, *, cwd: Path) -> str:
    """Run ``command`` with bash inside ``env`` as the local backend does; its stdout."""
    result = await anyio.run_process(
        ["bash", "-c", env.wrap(command)], cwd=cwd, env={**os.environ, **env.env_vars}
    )
    return result.stdout.decode()


def env_dirs(cache_dir: Path) -> list[Path]:
    """Environment directories (not lock files) under ``cache_dir``."""
    if not cache_dir.exists():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.is_dir())


async def list_env_dirs(cache_dir: Path) -> list[Path]:
    return await anyio.to_thread.run_sync(env_dirs, cache_dir)


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


async def wait_for_env_dir(cache_dir: Path) -> None:
    """Return once an environment directory exists under ``cache_dir``."""
    while True:
        if await list_env_dirs(cache_dir):
            return
        await anyio.sleep(0.02)


class StepRecorder:
    """Wraps the build-step runner to count the processes each build starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.argvs: list[list[str]] = []
        original = venv_module.run_step

        async def recording(argv: Sequence[str | Path], **kwargs: Any) -> None:
            self.argvs.append([str(a) for a in argv])
            await original(argv, **kwargs)

        monkeypatch.setattr(venv_module, "run_step", recording)

    def count(self, *needle: str) -> int:
        n = len(needle)
        return sum(
            any(tuple(argv[i : i + n]) == needle for i in range(len(argv))) for argv in self.argvs
        )


@pytest.fixture
def no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds must not touch the network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("UV_OFFLINE", "1")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "envs"


# --- spec parsing and hashing (pure) ---------------------------------------------------


def test_python_env_spec_resolves_paths_against_project(tmp_path: Path) -> None:
    text = textwrap.dedent("""
        python: "3.11"
        build_dependencies: [pip, setuptools]
        dependencies:
          - -r requirements.txt
          - numpy==1.26
          - ./vendor/pkg
          - -e ../sibling
    """)
    spec = parse_python_env(text, path=tmp_path / "python_env.yaml", base_dir=tmp_path)
    assert spec.python == "3.11"
    assert spec.build_dependencies == ("pip", "setuptools")
    assert requirement_lines(spec.dependencies, tmp_path) == [
        f"-r {tmp_path / 'requirements.txt'}",
        "numpy==1.26",
        str(tmp_path / "vendor/pkg"),
        f"-e {tmp_path / '../sibling'}",
    ]


def test_python_env_without_python_uses_current_version(tmp_path: Path) -> None:
    spec = parse_python_env("dependencies: [six]\n", path=tmp_path / "p.yaml", base_dir=tmp_path)
    assert spec.python == current_python_version()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("python: 3.10\n", "quote the version"),
        ("python: '3.11'\ndependencies: numpy\n", "'dependencies' must be a list of strings"),
        ("pyhton: '3.11'\n", "unknown key"),
        ("[1, 2]\n", "expected a mapping"),
        ("python: [\n", "invalid YAML"),
    ],
)
def test_bad_python_env_names_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "python_env.yaml"
    with pytest.raises(EnvironmentBuildError, match=match) as info:
        parse_python_env(text, path=path, base_dir=tmp_path)
    assert str(path) in str(info.value)


def test_conda_yaml_keeps_python_and_pip_dependencies(tmp_path: Path) -> None:
    text = textwrap.dedent("""
        name: demo
        channels: [conda-forge]
        dependencies:
          - python=3.10.*
          - pip=23.1
          - numpy=1.26
          - conda-forge::libgcc
          - pip:
            - scikit-learn==1.4.2
            - -r requirements.txt
    """)
    spec, dropped = parse_conda_env(text, path=tmp_path / "conda.yaml", base_dir=tmp_path)
    assert spec.python == "3.10"
    assert spec.build_dependencies == ("pip==23.1.*",)
    assert spec.dependencies == ("scikit-learn==1.4.2", "-r requirements.txt")
    assert dropped == ["numpy=1.26", "conda-forge::libgcc"]


def test_conda_project_under_virtualenv_warns_about_dropped_deps(tmp_path: Path) -> None:
    root = make_project(
        tmp_path / "p",
        MLPROJECT,
        {"conda.yaml": "dependencies:\n  - python=3.11\n  - numpy\n  - pip:\n    - six\n"},
    )
    project = load_project(root)
    assert select_env_manager(project, None) == "conda"
    with pytest.warns(UserWarning, match="dropped: numpy"):
        spec = load_python_spec(project)
    assert (spec.python, spec.dependencies) == ("3.11", ("six",))


def test_no_env_file_means_current_python_and_no_deps(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path / "p", MLPROJECT))
    assert select_env_manager(project, None) == "virtualenv"
    spec = load_python_spec(project)
    assert spec.python == current_python_version()
    assert spec.build_dependencies == spec.dependencies == ()


def test_digest_is_stable_and_follows_requirement_files(tmp_path: Path) -> None:
    root = make_project(
        tmp_path / "p",
        MLPROJECT,
        {
            "python_env.yaml": 'python: "3.11"\ndependencies: ["-r requirements.txt"]\n',
            "requirements.txt": "six\n-r more.txt\n",
            "more.txt": "attrs\n",
        },
    )
    project = load_project(root)
    first = spec_digest(load_python_spec(project), "virtualenv")
    assert spec_digest(load_python_spec(project), "virtualenv") == first
    assert spec_digest(load_python_spec(project), "uv") != first

    (root / "requirements.txt").write_text("six==1.16\n-r more.txt\n")
    second = spec_digest(load_python_spec(project), "virtualenv")
    assert second != first
    (root / "more.txt").write_text("attrs==23.1\n")  # a nested file counts too
    third = spec_digest(load_python_spec(project), "virtualenv")
    assert third not in (first, second)
    (root / "python_env.yaml").write_text('python: "3.12"\ndependencies: ["-r requirements.txt"]\n')
    assert spec_digest(load_python_spec(project), "virtualenv") not in (first, second, third)


def test_same_index_requirements_share_a_key_across_projects(tmp_path: Path) -> None:
    env = {"python_env.yaml": 'python: "3.11"\ndependencies: [six]\n'}
    a = load_python_spec(load_project(make_project(tmp_path / "a", MLPROJECT, env)))
    b = load_python_spec(load_project(make_project(tmp_path / "b", MLPROJECT, env)))
    assert spec_digest(a, "virtualenv") == spec_digest(b, "virtualenv")


def test_local_path_dependencies_are_keyed_by_location(tmp_path: Path) -> None:
    env = {"python_env.yaml": 'python: "3.11"\ndependencies: [./pkg]\n'}
    a = load_python_spec(load_project(make_project(tmp_path / "a", MLPROJECT, env)))
    b = load_python_spec(load_project(make_project(tmp_path / "b", MLPROJECT, env)))
    assert spec_digest(a, "virtualenv") != spec_digest(b, "virtualenv")


def test_missing_requirements_file_is_reported_before_building(tmp_path: Path) -> None:
    root = make_project(
        tmp_path / "p", MLPROJECT, {"python_env.yaml": "dependencies: [-r nope.txt]\n"}
    )
    spec = load_python_spec(load_project(root))
    with pytest.raises(EnvironmentBuildError, match=r"nope\.txt.*cannot be read"):
        spec_digest(spec, "virtualenv")


# --- interpreter lookup ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("3.11", (3, 11)),
        ("3.11.7", (3, 11, 7)),
        ("==3.10", (3, 10)),
        ("3.9.*", (3, 9)),
        ("3", (3,)),
    ],
)
def test_version_requests(text: str, parts: tuple[int, ...]) -> None:
    assert parse_version_request(text) == parts


def test_version_matching() -> None:
    assert version_matches((3, 11), (3, 11, 7))
    assert version_matches((3, 11, 7), (3, 11, 7))
    assert not version_matches((3, 11, 7), (3, 11, 2))
    assert not version_matches((3, 1), (3, 11, 7))


@pytest.mark.parametrize(
    ("text", "match"), [("latest", "Cannot understand"), ("2.7", "need Python 3")]
)
def test_bad_version_requests(text: str, match: str) -> None:
    with pytest.raises(EnvironmentBuildError, match=match):
        parse_version_request(text)


async def test_running_python_is_found_by_minor_and_exact_version() -> None:
    for request in (CURRENT, current_python_version()):
        found = await find_interpreter(request)
        assert found.version == tuple(sys.version_info[:3])


async def test_missing_version_says_what_to_install() -> None:
    with pytest.raises(EnvironmentBuildError) as info:
        await find_interpreter("3.99")
    message = str(info.value)
    assert "Python 3.99" in message
    assert "pyenv install 3.99" in message
    assert "uv python install 3.99" in message


def _fake_python(path: Path, version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)


@pytest.fixture
def fake_pythons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with python3.77 (3.77.1) and a pyenv root with 3.78.0 and 3.78.2."""
    bindir = tmp_path / "bin"
    _fake_python(bindir / "python3.77", "3.77.1")
    _fake_python(bindir / "python3", "3.76.0")
    root = tmp_path / "pyenv"
    for version in ("3.78.0", "3.78.2", "3.79.0"):
        _fake_python(root / "versions" / version / "bin" / "python", version)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYENV_ROOT", str(root))
    return tmp_path


async def test_interpreters_on_path_and_in_pyenv(fake_pythons: Path) -> None:
    on_path = await find_interpreter("3.77")
    assert (on_path.path, on_path.version) == (fake_pythons / "bin/python3.77", (3, 77, 1))
    newest = await find_interpreter("3.78")  # any 3.78.x: the newest installed one
    assert newest.path == fake_pythons / "pyenv/versions/3.78.2/bin/python"
    exact = await find_interpreter("3.78.0")
    assert exact.path == fake_pythons / "pyenv/versions/3.78.0/bin/python"
    with pytest.raises(EnvironmentBuildError, match=r"Python 3\.78\.1 is required"):
        await find_interpreter("3.78.1")


# --- real builds -----------------------------------------------------------------------


@pytest.mark.slow
async def test_concurrent_prepares_build_once_and_reuse(
    tmp_path: Path, cache_dir: Path, no_index: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    steps = StepRecorder(monkeypatch)
    envs: list[PreparedEnv] = []

    async def prepare() -> None:
        envs.append(await prepare_env(project, "virtualenv", cache_dir=cache_dir))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(prepare)
    build_time = time.monotonic() - started
    assert steps.count("-m", "venv") == 1
    assert len({e.directory for e in envs}) == 1
    env = envs[0]
    assert (env.manager, env.tag) == ("virtualenv", "virtualenv")
    assert env.directory is not None
    assert env.directory.parent == cache_dir
    assert len(env.directory.name) == len("virtualenv-") + 16
    marker = json.loads(await anyio.Path(env.directory / MARKER_NAME).read_text())
    assert marker["python_version"] == current_python_version()
    assert marker["built_by_pid"] == os.getpid()

    started = time.monotonic()
    again = await prepare_env(project, "virtualenv", cache_dir=cache_dir)
    hit_time = time.monotonic() - started
    assert again == env
    assert steps.count("-m", "venv") == 1
    print(f"virtualenv build {build_time:.2f}s, cache hit {hit_time * 1000:.1f}ms")
    assert hit_time < 0.5

    out = await run_in_env(
        env, "python -c 'import os, sys; print(os.environ[\"VIRTUAL_ENV\"], sys.prefix)'", cwd=root
    )
    assert out.split() == [str(env.directory), str(env.directory)]


@pytest.mark.slow
async def test_dependency_from_requirements_file_is_installed(
    tmp_path: Path, cache_dir: Path, no_index: None
) -> None:
    root = await anyio.to_thread.run_sync(wheel_project, tmp_path / "p")
    project = await anyio.to_thread.run_sync(load_project, root)
    output: list[bytes] = []
    env = await prepare_env(project, "virtualenv", cache_dir=cache_dir, on_output=output.append)
    assert b"tinypkg" in b"".join(output)  # pip's output reached the caller
    out = await run_in_env(
        env,
        "python -c 'import os, tinypkg; print(tinypkg.VALUE, os.environ[\"VIRTUAL_ENV\"])'",
        cwd=tmp_path,
    )
    assert out.split() == ["42", str(env.directory)]


@pytest.mark.slow
async def test_failed_install_reports_pip_and_leaves_nothing(
    tmp_path: Path, cache_dir: Path, no_index: None
) -> None:
    root = await anyio.to_thread.run_sync(
        lambda: make_project(
            tmp_path / "p", MLPROJECT, {"python_env.yaml": "dependencies: [./no-such-package]\n"}
        )
    )
    project = await anyio.to_thread.run_sync(load_project, root)
    with pytest.raises(EnvironmentBuildError) as info:
        await prepare_env(project, "virtualenv", cache_dir=cache_dir)
    message = str(info.value)
    assert "with pip failed (exit code" in message
    assert "no-such-package" in message
    assert "last output" in message
    assert str(root / "python_env.yaml") in message
    assert await list_env_dirs(cache_dir) == []


@pytest.mark.slow
async def test_cancel_during_build_leaves_no_directory(tmp_path: Path, cache_dir: Path) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: prepare_env(project, "virtualenv", cache_dir=cache_dir))
        with anyio.fail_after(30):
            await wait_for_env_dir(cache_dir)  # `python -m venv` is under way
        await anyio.sleep(0.3)
        assert await anyio.to_thread.run_sync(processes_mentioning, str(cache_dir))
        tg.cancel_scope.cancel()
    assert await list_env_dirs(cache_dir) == []
    assert await anyio.to_thread.run_sync(processes_mentioning, str(cache_dir)) == []


async def test_stale_half_built_directory_is_rebuilt(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory without the marker (a crashed build) is removed and built again."""
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    built: list[Path] = []

    async def fake_build(
        manager: str, spec: Any, target: Path, on_output: Any
    ) -> dict[str, object]:
        assert not await anyio.Path(target / "junk").exists()
        await anyio.Path(target / "bin").mkdir(parents=True)
        built.append(target)
        return {}

    monkeypatch.setattr(venv_module, "_build", fake_build)
    spec = await anyio.to_thread.run_sync(load_python_spec, project)
    digest = await anyio.to_thread.run_sync(spec_digest, spec, "virtualenv")
    stale = cache_dir / f"virtualenv-{digest[:16]}"
    await anyio.Path(stale).mkdir(parents=True)
    await anyio.Path(stale / "junk").write_text("half built")
    env = await prepare_env(project, "virtualenv", cache_dir=cache_dir)
    assert built == [stale]
    assert env.directory == stale
    assert await anyio.Path(stale / MARKER_NAME).exists()


async def test_build_that_raises_leaves_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    calls = 0

    async def failing_build(
        manager: str, spec: Any, target: Path, on_output: Any
    ) -> dict[str, object]:
        nonlocal calls
        calls += 1
        await anyio.Path(target).mkdir(parents=True)
        await anyio.sleep(0.05)
        raise EnvironmentBuildError("boom")

    monkeypatch.setattr(venv_module, "_build", failing_build)

    async def prepare() -> None:
        with pytest.raises(EnvironmentBuildError, match="boom"):
            await prepare_env(project, "virtualenv", cache_dir=cache_dir)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(prepare)
    # The callers that queued behind the failed build share its error: one build, not three.
    assert calls == 1
    assert await list_env_dirs(cache_dir) == []
    # A failure is not cached: a later caller builds anew.
    await prepare()
    assert calls == 2


_CHILD = """
import logging, sys
from pathlib import Path
import anyio
from aioproj.envs import prepare_env
from aioproj.project import load_project

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
env = anyio.run(lambda: prepare_env(load_project(Path(sys.argv[1])), "virtualenv",
                                    cache_dir=Path(sys.argv[2])))
print(env.directory)
"""


@pytest.mark.slow
async def test_two_processes_build_once(tmp_path: Path, cache_dir: Path, no_index: None) -> None:
    root = await anyio.to_thread.run_sync(wheel_project, tmp_path / "p")
    outputs: dict[int, tuple[bytes, bytes]] = {}

    async def child(index: int) -> None:
        done = await anyio.run_process(
            [sys.executable, "-c", _CHILD, str(root), str(cache_dir)], check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        outputs[index] = (done.stdout, done.stderr)

    async with anyio.create_task_group() as tg:
        for index in range(2):
            tg.start_soon(child, index)
    directories = {out.decode().strip() for out, _ in outputs.values()}
    assert len(directories) == 1
    building = [err for _, err in outputs.values() if b"Building virtualenv environment" in err]
    assert len(building) == 1, [err.decode() for _, err in outputs.values()]


@pytest.mark.slow
# LocalBackend.prepare calls shutil.which on the loop (os.stat); envs code is checked above.
@pytest.mark.allow_blocking
async def test_twenty_concurrent_runs_share_one_environment(
    tmp_path: Path, tracking_uri: str, no_index: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs with the default env manager (python_env → virtualenv) build once."""
    root = await anyio.to_thread.run_sync(wheel_project, tmp_path / "p")
    steps = StepRecorder(monkeypatch)
    async with Runner(echo="off") as runner:
        runs = []
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                runs.append(await runner.run(str(root)))

            for _ in range(20):
                tg.start_soon(one)
        statuses = [await run.get_status() for run in runs]
    assert statuses == [RunStatus.FINISHED] * 20
    assert steps.count("-m", "venv") == 1
    store = Path(tracking_uri.removeprefix("file://"))
    tags = await anyio.to_thread.run_sync(
        lambda: [p.read_text() for p in store.glob("*/*/tags/mlflow.project.env")]
    )
    assert tags == ["virtualenv"] * 20


async def test_docker_manager_refuses_a_python_env_project(tmp_path: Path, cache_dir: Path) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    with pytest.raises(EnvironmentBuildError, match=r"env_manager='local'.*'virtualenv'"):
        await prepare_env(project, "docker", cache_dir=cache_dir)
