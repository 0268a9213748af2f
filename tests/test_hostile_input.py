"""Hostile input: every case is refused with a clear error and leaves nothing behind.

Each test goes through :class:`aioproj.Runner` (the path users take) and then checks the
three places a half-done run could leave something: the tracking store (no run at all,
so no RUNNING record), the source cache (no entry, no temp dir) and the file system
outside the cache (nothing written where an archive or URL pointed).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner
from aioproj.project.spec import MAX_MLPROJECT_BYTES, MAX_MLPROJECT_NESTING

from .gitserver import GitServer
from .support import all_runs
from .test_sources import entries, git, init_repo, make_super_repo, temp_leftovers

pytestmark = pytest.mark.anyio

T = TypeVar("T")

MLPROJECT = """\
name: hostile
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
    command: "echo alpha={alpha}"
"""


async def inspect(check: Callable[[], T]) -> T:
    """Run a blocking check off the event loop."""
    return await anyio.to_thread.run_sync(check)


@pytest.fixture
def sources_cache() -> Path:
    """The source cache the runner uses (conftest points AIOPROJ_CACHE_DIR at a temp dir)."""
    return Path(os.environ["AIOPROJ_CACHE_DIR"]) / "sources"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path, where an injected ``touch PWNED`` would leave its file."""
    return tmp_path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Where escapes would land; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def _cache_is_clean(cache: Path) -> None:
    assert entries(cache, "archives") == []
    assert entries(cache, "git") == []
    assert temp_leftovers(cache) == []


async def refused(
    error: type[Exception],
    match: str,
    uri: str,
    *,
    tracking_uri: str,
    cache: Path,
    **kwargs: Any,
) -> str:
    """Run ``uri``; expect ``error`` (message matching ``match``), no run, a clean cache."""
    kwargs.setdefault("env_manager", "local")
    async with Runner(echo="off") as runner:
        with pytest.raises(error, match=match) as caught:
            await runner.run(uri, **kwargs)
        assert runner.active_runs == frozenset()
    assert await all_runs(tracking_uri) == []
    await inspect(lambda: _cache_is_clean(cache))
    return str(caught.value)


# --------------------------------------------------------------------------- archives


def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MLproject", MLPROJECT)
        for info, data in members:
            zf.writestr(info, data)
    return path


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK: the data is the target
    return info


def _tar(path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        data = MLPROJECT.encode()
        info = tarfile.TarInfo("MLproject")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        build(tf)
    return path


def _tar_file(name: str, data: bytes = b"x") -> Callable[[tarfile.TarFile], None]:
    def build(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    return build


def _tar_link(name: str, kind: bytes, target: str) -> Callable[[tarfile.TarFile], None]:
    def build(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        tf.addfile(info)

    return build


def _escaping_zips(root: Path, outside: Path) -> Iterator[tuple[Path, str]]:
    yield _zip(root / "dotdot.zip", [("../outside/x.txt", b"x")]), "outside the target"
    yield _zip(root / "deep.zip", [("a/b/../../../outside/x", b"x")]), "outside the target"
    yield _zip(root / "abs.zip", [(str(outside / "x.txt"), b"x")]), "outside the target"
    yield _zip(root / "backslash.zip", [("..\\outside\\x.txt", b"x")]), "outside the target"
    yield _zip(root / "link.zip", [(_symlink_info("l"), str(outside).encode())]), "symbolic link"


@pytest.mark.parametrize("case", range(5))
async def test_zip_slip_and_links(
    tmp_path: Path, outside: Path, sources_cache: Path, tracking_uri: str, case: int
) -> None:
    archive, message = await inspect(lambda: list(_escaping_zips(tmp_path, outside))[case])
    await refused(
        aioproj.SourceError, message, str(archive), tracking_uri=tracking_uri, cache=sources_cache
    )
    assert await inspect(lambda: list(outside.iterdir())) == []


def _escaping_tars(root: Path, outside: Path) -> list[tuple[Path, str]]:
    link = "is a link or a special file"
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("disk")
    device.type = tarfile.BLKTYPE
    return [
        (_tar(root / "dotdot.tgz", _tar_file("../outside/x")), "outside the target"),
        (_tar(root / "abs.tgz", _tar_file(str(outside / "x"))), "outside the target"),
        (_tar(root / "sym.tgz", _tar_link("etc", tarfile.SYMTYPE, "/etc")), link),
        (_tar(root / "symout.tgz", _tar_link("o", tarfile.SYMTYPE, str(outside))), link),
        (_tar(root / "hard.tgz", _tar_link("pw", tarfile.LNKTYPE, "/etc/passwd")), link),
        (_tar(root / "fifo.tgz", lambda tf: tf.addfile(fifo)), link),
        (_tar(root / "device.tgz", lambda tf: tf.addfile(device)), link),
    ]


@pytest.mark.parametrize("case", range(7))
async def test_tar_slip_links_and_special_files(
    tmp_path: Path, outside: Path, sources_cache: Path, tracking_uri: str, case: int
) -> None:
    archive, message = await inspect(lambda: _escaping_tars(tmp_path, outside)[case])
    await refused(
        aioproj.SourceError, message, str(archive), tracking_uri=tracking_uri, cache=sources_cache
    )
    assert await inspect(lambda: list(outside.iterdir())) == []


def _zero_bomb_zip(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MLproject", MLPROJECT)
        with zf.open("zeros.bin", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(chunk)
    return path


def _zero_bomb_tar(path: Path, size: int) -> Path:
    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    def build(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, io.BufferedReader(Zeros()))

    return _tar(path, build)


@pytest.mark.parametrize("kind", ["zip", "tgz"])
async def test_archive_bomb_is_refused_by_size(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    make = _zero_bomb_zip if kind == "zip" else _zero_bomb_tar
    archive = await inspect(lambda: make(tmp_path / f"bomb.{kind}", 32 << 20))
    assert (await anyio.Path(archive).stat()).st_size < 1 << 20  # small on the wire
    monkeypatch.setenv("AIOPROJ_MAX_ARCHIVE_BYTES", str(4 << 20))
    await refused(
        aioproj.SourceError,
        "over the limit of 4194304 bytes",
        str(archive),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


def _many_members(path: Path, kind: str, count: int) -> Path:
    if kind == "zip":
        return _zip(path, [(f"f{i}", b"") for i in range(count)])

    def build(tf: tarfile.TarFile) -> None:
        for i in range(count):
            _tar_file(f"f{i}", b"")(tf)

    return _tar(path, build)


@pytest.mark.parametrize("kind", ["zip", "tgz"])
async def test_archive_bomb_is_refused_by_member_count(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    archive = await inspect(lambda: _many_members(tmp_path / f"many.{kind}", kind, 300))
    monkeypatch.setenv("AIOPROJ_MAX_ARCHIVE_MEMBERS", "100")
    await refused(
        aioproj.SourceError,
        "more than 100 members.*AIOPROJ_MAX_ARCHIVE_MEMBERS",
        str(archive),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


async def test_bad_archive_limit_setting_is_a_clear_error(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = await inspect(lambda: _zip(tmp_path / "ok.zip", []))
    monkeypatch.setenv("AIOPROJ_MAX_ARCHIVE_MEMBERS", "lots")
    await refused(
        aioproj.SourceError,
        "AIOPROJ_MAX_ARCHIVE_MEMBERS must be a positive integer",
        str(archive),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


# --------------------------------------------------------------------------- git URLs


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ssh://-oProxyCommand=touch%20PWNED/repo.git", "begins with '-'"),
        ("ssh://git@-oProxyCommand=x/repo.git", "begins with '-'"),
        ("git@host:-upload-pack=touch.PWNED", "begins with '-'"),
        ("ext::sh -c touch% PWNED", "remote helpers"),
        ("fd::3", "remote helpers"),
        ("https://127.0.0.1:9/r.git\n--upload-pack=touch PWNED", "control character"),
        ("--upload-pack=touch PWNED", "does not exist"),
        ("-oProxyCommand=touch PWNED", "does not exist"),
    ],
)
async def test_git_urls_with_injected_options_are_refused(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    in_tmp: Path,
    uri: str,
    message: str,
) -> None:
    await refused(aioproj.SourceError, message, uri, tracking_uri=tracking_uri, cache=sources_cache)
    assert not await anyio.Path(tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "uri",
    ["http://[::1", "https://[]/x.zip", "A://[", "file://[", "https://alice:s3cret@[::1/r.git"],
)
async def test_uris_that_urlsplit_refuses_are_source_errors(
    sources_cache: Path, tracking_uri: str, in_tmp: Path, uri: str
) -> None:
    message = await refused(
        aioproj.SourceError,
        "not a well-formed URL",
        uri,
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert "s3cret" not in message


async def test_version_with_injected_option_is_just_an_unknown_version(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, in_tmp: Path
) -> None:
    repo = tmp_path / "repo"
    await inspect(lambda: init_repo(repo, {"MLproject": MLPROJECT}))
    await refused(
        aioproj.SourceError,
        "Unable to checkout version '--upload-pack=touch PWNED'",
        str(repo),
        version="--upload-pack=touch PWNED",
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert not await anyio.Path(tmp_path / "PWNED").exists()


HOSTILE_SUBMODULES = {
    "sub-ext": "ext::sh -c touch% PWNED",
    "sub-proxy": "ssh://-oProxyCommand=touch%20PWNED/x.git",
    "sub-option": "--upload-pack=touch PWNED",
}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    root = tmp_path_factory.mktemp("hostile-served")
    with GitServer(root) as server:
        lib = init_repo(root / "lib", {"lib.py": "VALUE = 1\n"})
        for name, url in HOSTILE_SUBMODULES.items():
            make_super_repo(root / name, url, lib)
            (root / name / "MLproject").write_text(MLPROJECT)
            git(root / name, "add", "MLproject")
            git(root / name, "commit", "-q", "-m", "project")
        yield server


@pytest.mark.parametrize("name", sorted(HOSTILE_SUBMODULES))
async def test_hostile_submodule_urls_are_refused(
    hostile_server: GitServer,
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    in_tmp: Path,
    name: str,
) -> None:
    message = "does not exist|Refusing git URL" if "option" in name else "Refusing git URL"
    await refused(
        aioproj.SourceError,
        message,
        hostile_server.url(name),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert not await anyio.Path(tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def local_submodules(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GitServer, Path]]:
    """Repositories served over HTTP whose ``.gitmodules`` point at a repository of this
    machine, outside what the server serves (a private repository)."""
    private = tmp_path_factory.mktemp("private") / "repo"
    lib = init_repo(private, {"PRIVATE.txt": "private data of this machine\n"})
    root = tmp_path_factory.mktemp("served-local-submodules")
    urls = {
        "abs-path": str(private),
        "file-url": private.as_uri(),
        "home-path": "~/private-repo",
        "bare-name": "private-repo",
        "other-scheme": "foo://host/repo.git",
    }
    with GitServer(root) as server:
        for name, url in urls.items():
            make_super_repo(root / name, url, lib)
            (root / name / "MLproject").write_text(MLPROJECT)
            git(root / name, "add", "MLproject")
            git(root / name, "commit", "-q", "-m", "project")
        yield server, private


@pytest.fixture
def git_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty global git config of the test's own, and no system config."""
    config = tmp_path / "gitconfig"
    config.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_ALLOW_PROTOCOL", raising=False)
    return config


@pytest.mark.parametrize(
    ("name", "transport"),
    [
        ("abs-path", "file"),
        ("file-url", "file"),
        ("home-path", "file"),
        ("bare-name", "file"),
        ("other-scheme", "foo"),
    ],
)
async def test_a_remote_repository_cannot_name_a_local_submodule(
    local_submodules: tuple[GitServer, Path],
    git_config: Path,
    sources_cache: Path,
    tracking_uri: str,
    name: str,
    transport: str,
) -> None:
    """A repository served over HTTP whose submodule is ``/srv/private-repo`` had that
    local repository checked out into the project (and, with -b databricks, shipped to
    DBFS); git refuses it since 2.38.1 (protocol.file.allow=user), and so does aioproj."""
    server, _private = local_submodules
    message = await refused(
        aioproj.SourceError,
        f"Refusing submodule 'lib' of {server.url(name)}: .* the '{transport}' transport",
        server.url(name),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert f"protocol.{transport}.allow" in message
    leftovers = await inspect(lambda: [p for p in sources_cache.rglob("PRIVATE.txt")])
    assert leftovers == []


@pytest.mark.parametrize("opt_in", ["GIT_ALLOW_PROTOCOL", "protocol.file.allow"])
async def test_local_submodules_are_fetched_when_git_would_allow_them(
    local_submodules: tuple[GitServer, Path],
    git_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracking_uri: str,
    opt_in: str,
) -> None:
    """The policy is git's: allowed as the user allows it in git (and only so)."""
    server, _private = local_submodules
    if opt_in == "GIT_ALLOW_PROTOCOL":
        monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "http:https:file")
    else:
        await anyio.Path(git_config).write_text('[protocol "file"]\n\tallow = always\n')
    async with Runner(echo="off") as runner:
        run = await runner.run(server.url("abs-path"), env_manager="local")
    assert await run.get_status() is aioproj.RunStatus.FINISHED
    cache = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "sources"
    assert await inspect(lambda: [p.name for p in cache.rglob("PRIVATE.txt")]) == ["PRIVATE.txt"]


async def test_a_local_superproject_may_name_local_submodules(
    tmp_path: Path, git_config: Path, tracking_uri: str
) -> None:
    """A local repository is the user's own: its local submodules are not refused."""
    lib = await inspect(lambda: init_repo(tmp_path / "lib", {"lib.py": "VALUE = 1\n"}))
    superproject = tmp_path / "super"

    def make() -> None:
        make_super_repo(superproject, str(tmp_path / "lib"), lib)
        (superproject / "MLproject").write_text(MLPROJECT)
        git(superproject, "add", "MLproject")
        git(superproject, "commit", "-q", "-m", "project")

    await inspect(make)
    async with Runner(echo="off") as runner:
        for uri in (str(superproject), superproject.as_uri()):
            run = await runner.run(uri, env_manager="local", version="main")
            assert await run.get_status() is aioproj.RunStatus.FINISHED


# --------------------------------------------------------------------------- MLproject


async def _project(root: Path, text: str) -> Path:
    def write() -> Path:
        root.mkdir(parents=True, exist_ok=True)
        (root / "MLproject").write_text(text)
        return root

    return await inspect(write)


async def test_enormous_mlproject_is_refused_before_parsing(
    tmp_path: Path, sources_cache: Path, tracking_uri: str
) -> None:
    padding = "# " + "x" * 1000 + "\n"
    text = MLPROJECT + padding * (MAX_MLPROJECT_BYTES // len(padding) + 1)
    project = await _project(tmp_path / "big", text)
    await refused(
        aioproj.MLprojectError,
        f"MLproject: the MLproject file is larger than {MAX_MLPROJECT_BYTES} bytes",
        str(project),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 200_000 + "]" * 200_000,  # crashed the process in libyaml before the guard
        "{a: " * 5_000 + "1" + "}" * 5_000,
        "\n" + "- " * 200_000 + "x",
    ],
    ids=["flow-lists", "flow-maps", "block-lists"],
)
async def test_deeply_nested_yaml_is_refused(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, nested: str
) -> None:
    project = await _project(tmp_path / "deep", f"name: deep\nextra: {nested}\n")
    started = time.monotonic()
    await refused(
        aioproj.MLprojectError,
        f"nests deeper than {MAX_MLPROJECT_NESTING} levels",
        str(project),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    print(f"refused in {time.monotonic() - started:.3f}s")


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: *i
entry_points: *i
"""


async def test_alias_bomb_is_a_schema_error_not_a_memory_blowup(
    tmp_path: Path, sources_cache: Path, tracking_uri: str
) -> None:
    """Aliases are shared, never expanded: 9**9 'lol's cost nine lists, and the error
    describes the value without printing it."""
    project = await _project(tmp_path / "laughs", BILLION_LAUGHS)
    message = await refused(
        aioproj.MLprojectError,
        "must be a string, got a list",
        str(project),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert len(message) < 500


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('command: "echo \\0 hi"', "NUL character"),
        ("docker_env: {image: x, environment: [['A=B', v]]}", "not an environment variable"),
        ("docker_env: {image: x, environment: ['-e']}", "not an environment variable"),
        ("docker_env: {image: x, environment: ['X Y']}", "not an environment variable"),
        ('docker_env: {image: x, environment: [[A, "\\0"]]}', "NUL character"),
    ],
)
async def test_mlproject_values_no_process_can_take(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, snippet: str, message: str
) -> None:
    if snippet.startswith("command"):
        text = f"entry_points:\n  main:\n    {snippet}\n"
    else:
        text = f"{snippet}\nentry_points:\n  main:\n    command: echo hi\n"
    project = await _project(tmp_path / "p", text)
    await refused(
        aioproj.MLprojectError,
        message,
        str(project),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


WIDE = """\
entry_points:
  main:
    parameters: {b: {type: string, default: x}}
    command: "echo %s"
  filled:
    parameters: {b: {type: string, default: x}, w: {type: string, default: "5"}}
    command: "echo {b:>{w}}"
"""


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("command", "entry_point", "parameters", "error", "message"),
    [
        # 125 bytes of MLproject froze the loop for 57 s and grew the driver to 1.9 GB.
        ("{b:>500000000}", "main", {}, aioproj.MLprojectError, "width or precision of 500000000"),
        ("{b:>2000000000}", "main", {}, aioproj.MLprojectError, "width or precision"),
        ("{b:.99999999999999999999}", "main", {}, aioproj.MLprojectError, "width or precision"),
        ("{b}" + "x" * 140_000, "main", {}, aioproj.MLprojectError, "command line holds less"),
        ("{b}", "filled", {"w": "500000000"}, aioproj.ParameterError, "filled from a parameter"),
    ],
    ids=["width", "width-2e9", "precision", "long-template", "width-from-a-value"],
)
async def test_format_widths_no_command_line_can_hold_are_refused_before_rendering(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    command: str,
    entry_point: str,
    parameters: dict[str, str],
    error: type[Exception],
    message: str,
) -> None:
    project = await _project(tmp_path / "p", WIDE % command)
    assert await all_runs(tracking_uri) == []  # imports mlflow before the measure
    before = _peak_rss_mb()
    await refused(
        error,
        message,
        str(project),
        entry_point=entry_point,
        parameters=parameters,
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert _peak_rss_mb() - before < 100  # rendering it would have taken 500 MB to 7.6 GB


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"b": "x" * 140_000}, "'b' of entry point 'main' is 140,000 characters long"),
        ({f"k{i}": "1" for i in range(100_000)}, "with its 100,000 parameters"),
        ({"b": "x" * 100_000, "c": "y" * 40_000}, "The longest: 'b' \\(100,000 characters\\)"),
        ({"b": "é" * 70_000}, "is 140,000 bytes long"),
    ],
    ids=["one-140-KB-value", "100000-values", "two-that-add-up", "multibyte"],
)
async def test_parameters_no_command_line_can_hold_create_no_run(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    parameters: dict[str, str],
    message: str,
) -> None:
    """They wrote 100,000 param files, then failed at exec ("Argument list too long")
    with a FAILED run; now a ParameterError comes before anything is tracked."""
    project = await _project(tmp_path / "p", WIDE % "{b}")
    await refused(
        aioproj.ParameterError,
        message,
        str(project),
        parameters=parameters,
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    store = Path(tracking_uri.removeprefix("file://"))
    assert not await inspect(lambda: list(store.glob("*/*/params")))


async def test_the_longest_command_a_command_line_holds_runs(
    tmp_path: Path, tracking_uri: str
) -> None:
    """The limit is the system's, not a guess: just under it, the run starts and works."""
    from aioproj.project.parameters import command_limit

    text = (
        "entry_points:\n  main:\n    parameters: {b: string}\n"
        '    command: "printf %s {b} | wc -c"\n'
    )
    project = await _project(tmp_path / "p", text)
    value = "v" * (command_limit() - len("printf %s  | wc -c") - 10)
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), parameters={"b": value}, env_manager="local")
        assert await run.get_status() is aioproj.RunStatus.FINISHED
        lines = [line async for line in run.logs()]
    assert [line.strip() for line in lines] == [str(len(value))]


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "key",
    ["--alpha", "a b", "a;b", "$(touch PWNED)", "`id`", "", "-", "1a", "a\nb", "é", "k" * 251],
)
async def test_parameter_keys_that_are_not_identifiers(
    tmp_path: Path,
    sources_cache: Path,
    tracking_uri: str,
    in_tmp: Path,
    key: str,
) -> None:
    project = await _project(tmp_path / "p", MLPROJECT)
    await refused(
        aioproj.ParameterError,
        "cannot be passed as an extra option",
        str(project),
        parameters={key: "1"},
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )
    assert not await anyio.Path(tmp_path / "PWNED").exists()


async def test_declared_parameter_names_that_are_not_tracking_keys(
    tmp_path: Path, sources_cache: Path, tracking_uri: str
) -> None:
    text = (
        'entry_points:\n  main:\n    parameters:\n      "a*b": {default: 1}\n'
        '    command: "echo {a*b}"\n'
    )
    project = await _project(tmp_path / "p", text)
    await refused(
        aioproj.MLprojectError,
        r"MLproject:4: entry_points.main.parameters.a\*b: cannot be a parameter name",
        str(project),
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


async def test_parameter_value_with_nul_creates_no_run(
    tmp_path: Path, sources_cache: Path, tracking_uri: str
) -> None:
    project = await _project(tmp_path / "p", MLPROJECT)
    await refused(
        aioproj.ParameterError,
        "NUL character",
        str(project),
        parameters={"extra": "a\0b"},
        tracking_uri=tracking_uri,
        cache=sources_cache,
    )


async def test_hostile_parameter_values_arrive_as_data(
    tmp_path: Path, tracking_uri: str, in_tmp: Path
) -> None:
    """The run works and the shell never interprets what a value holds."""
    text = (
        "entry_points:\n  main:\n    parameters:\n      v: string\n"
        '    command: "printf %s {v} > out.txt"\n'
    )
    project = await _project(tmp_path / "p", text)
    value = "$(touch PWNED)`touch PWNED`'; touch PWNED; '\n\"$HOME\""
    async with Runner(echo="off") as runner:
        await runner.run(str(project), parameters={"v": value}, env_manager="local")
    assert await anyio.Path(project / "out.txt").read_text() == value
    assert not await anyio.Path(project / "PWNED").exists()
    assert not await anyio.Path(tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- backend_config


async def test_unknown_backend_config_keys_for_the_local_backend_are_warned(
    tmp_path: Path, tracking_uri: str
) -> None:
    """MLflow drops them silently; aioproj runs the project and says which keys it ignored
    (never their values, which may be tokens)."""
    project = await _project(tmp_path / "p", MLPROJECT)
    async with Runner(echo="off") as runner:
        with pytest.warns(UserWarning, match=r"ignoring the keys \['new_cluster', 'token'\]") as w:
            run = await runner.run(
                str(project),
                env_manager="local",
                backend_config={"new_cluster": {"x": 1}, "token": "s3cr3t-value"},
            )
    assert "s3cr3t-value" not in str(w[0].message)
    (record,) = await all_runs(tracking_uri)
    assert record.info.run_id == run.run_id
    assert record.info.status == "FINISHED"


async def test_empty_backend_config_for_the_local_backend_is_silent(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await _project(tmp_path / "p", MLPROJECT)
    async with Runner(echo="off") as runner:
        await runner.run(str(project), env_manager="local", backend_config={})


# --------------------------------------------------------------------------- tracking


@pytest.mark.parametrize(
    "kwargs",
    [
        {"run_id": "../../outside"},
        {"run_id": "0" * 32 + "\n"},
        {"experiment_id": "../0"},
        {"experiment_id": "0\n"},
        {"experiment_name": "x" * 1000},
    ],
    ids=["run-id-dotdot", "run-id-newline", "exp-id-dotdot", "exp-id-newline", "exp-name-long"],
)
async def test_tracking_arguments_that_would_name_other_files(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, kwargs: dict[str, str]
) -> None:
    project = await _project(tmp_path / "p", MLPROJECT)
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.InvalidArgumentError, match="Invalid"):
            await runner.run(str(project), env_manager="local", **kwargs)  # type: ignore[arg-type]
    assert await all_runs(tracking_uri) == []
    assert not await anyio.Path(tmp_path / "outside").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"run_name": "lone \ud800 surrogate"},
        {"run_name": "undecodable \udcff file name"},
        {"run_name": "nul \0 byte"},
        {"run_name": "r" * 251},
        {"experiment_name": "lone \udc80 surrogate"},
        {"experiment_name": "nul \0 byte"},
    ],
    ids=["run-surrogate", "run-undecodable", "run-nul", "run-long", "exp-surrogate", "exp-nul"],
)
async def test_names_no_store_can_take_leave_nothing_written(
    tmp_path: Path, sources_cache: Path, tracking_uri: str, kwargs: dict[str, str]
) -> None:
    """A lone surrogate in a run name raised UnicodeEncodeError and left a run folder
    without meta.yaml: now every name is checked before anything is written."""
    project = await _project(tmp_path / "p", MLPROJECT)
    for detach in (False, True):
        async with Runner(echo="off") as runner:
            with pytest.raises(aioproj.InvalidArgumentError, match="no tracking store can"):
                await runner.run(
                    str(project), env_manager="local", synchronous=not detach, detach=detach,
                    **kwargs,  # type: ignore[arg-type]
                )  # fmt: skip
    assert await all_runs(tracking_uri) == []
    store = Path(tracking_uri.removeprefix("file://"))
    written = await inspect(
        lambda: sorted(p.name for p in store.glob("*")) if store.exists() else []
    )
    assert written in ([], [".trash", "0"])  # at most the Default experiment, no run
    await inspect(lambda: _cache_is_clean(sources_cache))
