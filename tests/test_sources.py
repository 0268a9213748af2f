"""aioproj.sources: local dirs, archives and git over smart HTTP on 127.0.0.1.

Async test bodies must not block (the blockbuster fixture fails them), so file-system
checks run through :func:`inspect`, in a worker thread.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import pytest

import aioproj
from aioproj.errors import ExecutionError, SourceError
from aioproj.sources import FetchedProject, SourceCache, parse_project_uri, redact_url
from aioproj.sources.git import resolve_submodule_url
from aioproj.sources.uri import (
    archive_kind,
    git_transport,
    is_git_uri,
    looks_like_local_path,
    redact_text,
)
from tests.gitserver import FileServer, GitServer, closed_port
from tests.support import all_runs

pytestmark = pytest.mark.anyio

T = TypeVar("T")
TOKEN = "s3cr3t-t0ken"


async def inspect(check: Callable[[], T]) -> T:
    """Run a blocking check (file reads, git) off the event loop."""
    return await anyio.to_thread.run_sync(check)


# ---------------------------------------------------------------- repositories


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def init_repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    write_files(path, files)
    return commit_all(path, "first")


@dataclass(frozen=True)
class Shas:
    first: str  # on main, not the tip of any ref: only a full fetch reaches it
    main: str
    dev: str


def make_project_repo(path: Path) -> Shas:
    """main: first -> second; dev (from second): + dev.txt, annotated tag v1."""
    first = init_repo(path, {"MLproject": "name: demo\n", "sub/MLproject": "name: sub\n"})
    (path / "second.txt").write_text("2\n")
    main = commit_all(path, "second")
    git(path, "checkout", "-q", "-b", "dev")
    (path / "dev.txt").write_text("dev\n")
    dev = commit_all(path, "dev")
    git(path, "tag", "-a", "v1", "-m", "release")
    git(path, "checkout", "-q", "main")
    return Shas(first, main, dev)


def make_super_repo(path: Path, lib_url: str, lib_commit: str) -> None:
    """A repository whose ``lib`` is a submodule at ``lib_url``, pinned to ``lib_commit``."""
    init_repo(path, {"MLproject": "name: super\n"})
    (path / ".gitmodules").write_text(f'[submodule "lib"]\n\tpath = lib\n\turl = {lib_url}\n')
    git(path, "update-index", "--add", "--cacheinfo", f"160000,{lib_commit},lib")
    git(path, "add", ".gitmodules")
    git(path, "commit", "-q", "-m", "add submodule")  # not add -A: lib/ is not checked out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitServer, Shas]]:
    root = tmp_path_factory.mktemp("served")
    with GitServer(root) as server:
        shas = make_project_repo(root / "proj")
        lib = init_repo(root / "lib", {"lib.py": "VALUE = 1\n"})
        make_super_repo(root / "super-abs", server.url("lib"), lib)
        make_super_repo(root / "super-rel", "../lib", lib)
        yield server, shas


@pytest.fixture
def server(served: tuple[GitServer, Shas]) -> Iterator[GitServer]:
    served[0].reset()
    yield served[0]
    served[0].reset()


@pytest.fixture
def shas(served: tuple[GitServer, Shas]) -> Shas:
    return served[1]


@pytest.fixture
def cache_root() -> Path:
    return Path(os.environ["AIOPROJ_CACHE_DIR"]) / "sources"


def entries(root: Path, kind: str) -> list[Path]:
    """Finished cache entries of one kind: git/<url key>/<commit> or archives/<sha>."""
    base = root / kind
    if not base.is_dir():
        return []
    if kind == "archives":
        return sorted(base.iterdir())
    return sorted(p for key in base.iterdir() for p in key.iterdir())


def temp_leftovers(root: Path) -> list[Path]:
    tmp = root / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under root with mode, mtime and content (to prove nothing changed).

    ``.git/index`` is left out: ``git status`` itself rewrites it for racily-clean files;
    compare ``git ls-files --stage`` for it instead.
    """
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path != root / ".git" / "index":
            st = path.stat()
            result[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, path.read_bytes())
    return result


def changed(before: dict[str, T], after: dict[str, T]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# ---------------------------------------------------------------- pure URI parsing


def test_parse_project_uri_strips_quotes_and_splits_subdir() -> None:
    parsed = parse_project_uri("'https://h/r.git#examples/sklearn'")
    assert (parsed.uri, parsed.base, parsed.subdir) == (
        "https://h/r.git#examples/sklearn",
        "https://h/r.git",
        "examples/sklearn",
    )
    assert parse_project_uri('"/a/b"').subdir == ""


@pytest.mark.parametrize("uri", ["/p#../x", "/p#a.b", "/p#./a", "/p#.."])
def test_dot_in_subdir_rejected(uri: str) -> None:
    with pytest.raises(SourceError, match=r"'\.' is not allowed in project subdirectory paths\."):
        parse_project_uri(uri)


def test_uri_classification() -> None:
    assert archive_kind("https://h/a.zip?x=1") == "zip"
    assert archive_kind("/p/a.tar.gz") == "tar"
    assert archive_kind("/p/a.tgz") == "tar"
    assert archive_kind("https://h/repo.git") is None
    assert is_git_uri("git@github.com:org/repo.git")
    for url in ("ssh://git@h/r", "git://h/r", "https://h/r", "file:///srv/r.git"):
        assert is_git_uri(url)
    assert not is_git_uri("relative/dir")
    for path in ("./x", "../x", "~/x", "/x", "x"):
        assert looks_like_local_path(path)
    assert not looks_like_local_path("https://h/r")


def test_redaction() -> None:
    url = f"https://user:{TOKEN}@h.example/r.git"
    assert redact_url(url) == "https://h.example/r.git"
    assert redact_url(f"https://{TOKEN}@h.example/r.git#sub") == "https://h.example/r.git#sub"
    assert redact_url("ssh://git:pw@h/r") == "ssh://git@h/r"
    assert redact_url("git@h:org/r.git") == "git@h:org/r.git"
    assert TOKEN not in redact_text(f"failed for {url} with user:{TOKEN}", url)


def test_submodule_url_resolution() -> None:
    assert resolve_submodule_url("https://h/org/repo.git", "../lib.git") == "https://h/org/lib.git"
    assert resolve_submodule_url("https://h/org/repo", "./lib") == "https://h/org/repo/lib"
    assert resolve_submodule_url("git@h:org/repo.git", "../lib.git") == "git@h:org/lib.git"
    assert resolve_submodule_url("https://h/r", "https://x/y") == "https://x/y"


@pytest.mark.parametrize(
    "url",
    ["/srv/private", "srv/private", "~/repo", "file:///srv/x", "file://localhost/srv/x",
     "host:org/repo", "git@host:x", "https://h/x", "http://h/x", "git://h/x", "ssh://h/x",
     "git+ssh://h/x", "ssh+git://h/x", "foo://h/x", "HTTPS://h/x"],
)  # fmt: skip
def test_git_transport_agrees_with_the_client_dulwich_picks(url: str) -> None:
    """The submodule policy classifies a URL as the client that would fetch it does: a
    URL dulwich reads from the local disk is always 'file'."""
    from dulwich.client import LocalGitClient, get_transport_and_path

    client, _path = get_transport_and_path(url)
    transport = git_transport(url)
    assert (transport == "file") == isinstance(client, LocalGitClient), (url, client)
    assert transport in {"file", "ssh", "http", "https", "git", "foo"}


def test_source_error_is_execution_error() -> None:
    assert issubclass(SourceError, ExecutionError)


# ---------------------------------------------------------------- local directories


@pytest.fixture
def plain_project(tmp_path: Path) -> Path:
    project = tmp_path / "plain"
    write_files(project, {"MLproject": "name: plain\n", "sub/MLproject": "name: sub\n"})
    return project


async def test_local_dir_used_in_place(plain_project: Path, cache_root: Path) -> None:
    before = await inspect(lambda: snapshot(plain_project))
    fetched = await SourceCache().fetch(str(plain_project))
    assert fetched == FetchedProject(
        directory=plain_project, uri=str(plain_project), source_name=str(plain_project)
    )
    assert await inspect(lambda: snapshot(plain_project)) == before
    assert not await inspect(cache_root.exists)


async def test_file_uri_and_quotes(plain_project: Path) -> None:
    cache = SourceCache()
    assert (await cache.fetch(plain_project.as_uri())).directory == plain_project
    assert (await cache.fetch(f"'{plain_project}'")).directory == plain_project
    assert (await cache.fetch(f"{plain_project.as_uri()}#sub")).directory == plain_project / "sub"


async def test_local_subdirectory(plain_project: Path) -> None:
    fetched = await SourceCache().fetch(f"{plain_project}#sub")
    assert fetched.directory == plain_project / "sub"
    with pytest.raises(SourceError, match=f"Could not find subdirectory nope of {plain_project}"):
        await SourceCache().fetch(f"{plain_project}#nope")
    with pytest.raises(SourceError, match=r"'\.' is not allowed"):
        await SourceCache().fetch(f"{plain_project}#../plain")


async def test_version_on_non_git_dir(plain_project: Path) -> None:
    with pytest.raises(SourceError, match="Setting a version is only supported for Git project"):
        await SourceCache().fetch(str(plain_project), version="main")


@pytest.mark.parametrize("uri", ["/no/such/project", "./no-such-dir", "no-such-dir"])
async def test_missing_local_path(uri: str) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        await SourceCache().fetch(uri)


async def test_not_a_directory(tmp_path: Path) -> None:
    await inspect(lambda: (tmp_path / "f.txt").write_text("x"))
    with pytest.raises(SourceError, match="is not a directory"):
        await SourceCache().fetch(str(tmp_path / "f.txt"))


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
async def test_bare_repository_without_version_says_it_needs_one(
    tmp_path: Path, as_uri: bool
) -> None:
    shas = await inspect(lambda: make_project_repo(tmp_path / "src"))
    bare = tmp_path / "bare.git"
    await inspect(lambda: git(tmp_path, "clone", "-q", "--bare", "src", "bare.git"))
    uri = bare.as_uri() if as_uri else str(bare)
    with pytest.raises(SourceError) as caught:
        await SourceCache().fetch(uri)
    message = str(caught.value)
    assert f"No MLproject was found in {bare}" in message
    assert "bare git repository" in message
    assert "Give a version" in message
    assert "-v BRANCH" in message
    fetched = await SourceCache().fetch(uri, version="main")  # a version runs a commit
    assert fetched.git_commit == shas.main
    assert await inspect(lambda: (fetched.directory / "MLproject").read_text()) == "name: demo\n"


async def test_bare_repository_run_creates_no_run(tmp_path: Path, tracking_uri: str) -> None:
    await inspect(lambda: make_project_repo(tmp_path / "src"))
    await inspect(lambda: git(tmp_path, "clone", "-q", "--bare", "src", "bare.git"))
    with pytest.raises(SourceError, match="bare git repository"):
        await aioproj.run(str(tmp_path / "bare.git"), env_manager="local")
    assert await all_runs(tracking_uri) == []


@pytest.fixture
def local_repo(tmp_path: Path) -> tuple[Path, Shas]:
    repo = tmp_path / "user-repo"
    shas = make_project_repo(repo)
    git(repo, "remote", "add", "origin", f"https://me:{TOKEN}@git.example/user-repo.git")
    (repo / "MLproject").write_text("name: edited but not committed\n")
    return repo, shas


async def test_local_git_tags_without_version(local_repo: tuple[Path, Shas]) -> None:
    repo, shas = local_repo
    fetched = await SourceCache().fetch(f"{repo}#sub")
    assert fetched.directory == repo / "sub"
    assert fetched.source_name == f"file://{repo}#sub"
    assert fetched.git_commit == shas.main
    assert fetched.git_repo_url == "https://git.example/user-repo.git"
    assert fetched.git_branch is None
    assert (await SourceCache().fetch(str(repo))).source_name == f"file://{repo}"


async def test_local_version_is_exported_not_checked_out(
    local_repo: tuple[Path, Shas], cache_root: Path
) -> None:
    repo, shas = local_repo
    before = await inspect(
        lambda: (git(repo, "status", "--porcelain"), git(repo, "ls-files", "-s"), snapshot(repo))
    )
    fetched = await SourceCache().fetch(str(repo), version="dev")
    assert fetched.directory.is_relative_to(cache_root)
    assert (fetched.git_commit, fetched.git_branch) == (shas.dev, "dev")
    assert fetched.source_name == f"file://{repo}"
    assert await inspect(lambda: (fetched.directory / "dev.txt").read_text()) == "dev\n"
    assert await inspect(lambda: (fetched.directory / "MLproject").read_text()) == "name: demo\n"
    after = await inspect(
        lambda: (git(repo, "status", "--porcelain"), git(repo, "ls-files", "-s"), snapshot(repo))
    )
    assert after[:2] == before[:2]
    assert changed(before[2], after[2]) == []
    assert await inspect(lambda: git(repo, "rev-parse", "--abbrev-ref", "HEAD")) == "main"


async def test_local_version_tag_sha_and_subdir(local_repo: tuple[Path, Shas]) -> None:
    repo, shas = local_repo
    cache = SourceCache()
    tagged = await cache.fetch(str(repo), version="v1")
    assert (tagged.git_commit, tagged.git_branch) == (shas.dev, None)
    short = await cache.fetch(f"{repo}#sub", version=shas.first[:8])
    assert short.git_commit == shas.first
    assert short.source_name == f"file://{repo}#sub"
    assert await inspect(lambda: (short.directory / "MLproject").read_text()) == "name: sub\n"
    assert not await inspect(lambda: (short.directory.parent / "second.txt").exists())
    with pytest.raises(SourceError, match="Unable to checkout version 'nope' of git repo"):
        await cache.fetch(str(repo), version="nope")


# ---------------------------------------------------------------- git over HTTP


async def test_git_default_branch(server: GitServer, shas: Shas, cache_root: Path) -> None:
    url = server.url("proj")
    fetched = await SourceCache().fetch(url)
    assert fetched == FetchedProject(
        directory=fetched.directory,
        uri=url,
        source_name=url,
        git_commit=shas.main,
        git_repo_url=url,
        git_branch=None,
    )
    assert fetched.directory.parent.parent == cache_root / "git"
    names = await inspect(lambda: sorted(p.name for p in fetched.directory.iterdir()))
    assert names == [".git", "MLproject", "second.txt", "sub"]
    status = await inspect(lambda: git(fetched.directory, "status", "--porcelain"))
    assert status == ""
    assert server.fetches() == 1


@pytest.mark.parametrize(
    ("version", "expected", "branch"),
    [
        ("dev", "dev", "dev"),
        ("main", "main", "main"),
        ("v1", "dev", None),
        ("refs/heads/dev", "dev", None),
        ("FULL:first", "first", None),
        ("FULL:dev", "dev", None),
        ("SHORT:first", "first", None),
        ("SHORT:dev", "dev", None),
    ],
)
async def test_git_versions(
    server: GitServer, shas: Shas, version: str, expected: str, branch: str | None
) -> None:
    if ":" in version:
        form, name = version.split(":")
        sha = getattr(shas, name)
        version = sha if form == "FULL" else sha[:7]
    fetched = await SourceCache().fetch(f"{server.url('proj')}#sub", version=version)
    assert fetched.git_commit == getattr(shas, expected)
    assert fetched.git_branch == branch
    assert fetched.directory.name == "sub"
    head = await inspect(lambda: git(fetched.directory, "rev-parse", "HEAD"))
    assert head == getattr(shas, expected)


async def test_git_bad_version(server: GitServer) -> None:
    url = server.url("proj")
    for bad in ("no-such-branch", "badc0de", "0" * 40):
        message = (
            f"Unable to checkout version '{bad}' of git repo {url} - "
            "please ensure that the version exists in the repo."
        )
        with pytest.raises(SourceError) as caught:
            await SourceCache().fetch(url, version=bad)
        assert str(caught.value) == message


async def test_git_missing_subdirectory(server: GitServer) -> None:
    with pytest.raises(SourceError, match="Could not find subdirectory nope of http://"):
        await SourceCache().fetch(f"{server.url('proj')}#nope")


async def test_git_unreachable_host() -> None:
    url = f"http://127.0.0.1:{closed_port()}/proj.git"
    with pytest.raises(SourceError, match="Unable to fetch git repo") as caught:
        await SourceCache().fetch(url)
    assert url in str(caught.value)
    assert "refused" in str(caught.value).lower()


async def test_git_repository_not_found(server: GitServer) -> None:
    with pytest.raises(SourceError, match="No git repository found at http://"):
        await SourceCache().fetch(server.url("missing"))


async def test_git_concurrent_fetches_clone_once(server: GitServer, cache_root: Path) -> None:
    url, cache = server.url("proj"), SourceCache()
    results: list[FetchedProject] = []

    async def one() -> None:
        results.append(await cache.fetch(url, version="dev"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert len({r.directory for r in results}) == 1
    assert server.fetches() == 1
    assert server.count("GET") == 2  # one shared ref listing, one by the clone
    assert len(await inspect(lambda: entries(cache_root, "git"))) == 1
    assert await inspect(lambda: temp_leftovers(cache_root)) == []


async def test_git_second_fetch_uses_cache(server: GitServer, shas: Shas) -> None:
    url = server.url("proj")
    first = await SourceCache().fetch(url, version="dev")
    server.clear()
    again = await SourceCache().fetch(url, version="dev")
    assert again.directory == first.directory
    assert server.fetches() == 0  # only the ref listing, no upload-pack
    by_sha = await SourceCache().fetch(url, version=shas.dev)
    assert by_sha.directory == first.directory
    assert server.count() == 1  # a cached full sha needs no request at all


async def test_git_cancelled_fetch_leaves_nothing(server: GitServer, cache_root: Path) -> None:
    server.delay = 0.6
    with anyio.move_on_after(0.2) as scope:
        await SourceCache().fetch(server.url("proj"), version="dev")
    assert scope.cancelled_caught
    assert await inspect(lambda: temp_leftovers(cache_root)) == []
    assert await inspect(lambda: entries(cache_root, "git")) == []
    server.delay = 0.0
    assert (await SourceCache().fetch(server.url("proj"), version="dev")).git_branch == "dev"


async def test_git_credentials_used_and_redacted(server: GitServer, shas: Shas) -> None:
    server.auth = ("user", TOKEN)
    url = server.url("proj", userinfo=f"user:{TOKEN}")
    fetched = await SourceCache().fetch(f"{url}#sub", version="dev")
    assert fetched.git_commit == shas.dev
    for value in (fetched.source_name, str(fetched.git_repo_url), repr(fetched)):
        assert TOKEN not in value
    assert fetched.git_repo_url == server.url("proj")
    config = await inspect(lambda: (fetched.directory.parent / ".git" / "config").read_text())
    assert TOKEN not in config

    wrong = server.url("proj", userinfo=f"user:{TOKEN}-wrong")
    with pytest.raises(SourceError, match="Authentication failed for git repo http://127") as e:
        await SourceCache().fetch(wrong)
    assert TOKEN not in str(e.value)
    for bad_url in (
        server.url("missing", userinfo=f"user:{TOKEN}"),
        f"http://user:{TOKEN}@127.0.0.1:{closed_port()}/x.git",
    ):
        server.auth = None
        with pytest.raises(SourceError) as e:
            await SourceCache().fetch(bad_url)
        assert TOKEN not in str(e.value)
        assert TOKEN not in repr(e.value.__cause__)


async def test_git_credentials_from_store_file(
    server: GitServer, shas: Shas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.auth = ("user", TOKEN)
    store = tmp_path / "home" / ".git-credentials"
    await inspect(lambda: store.parent.mkdir())
    await inspect(lambda: store.write_text(f"http://user:{TOKEN}@127.0.0.1\n"))
    monkeypatch.setenv("HOME", str(store.parent))
    fetched = await SourceCache().fetch(server.url("proj"), version="dev")
    assert fetched.git_commit == shas.dev


@pytest.mark.parametrize("name", ["super-abs", "super-rel"])
async def test_git_submodules(server: GitServer, name: str) -> None:
    fetched = await SourceCache().fetch(server.url(name))
    text = await inspect(lambda: (fetched.directory / "lib" / "lib.py").read_text())
    assert text == "VALUE = 1\n"


# ---------------------------------------------------------------- archives


def zip_bytes(members: dict[str, str], *, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | (0o755 if name.endswith(".sh") else 0o644)) << 16
            zf.writestr(info, text)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


PROJECT_FILES = {"MLproject": "name: zipped\n", "run.sh": "echo hi\n", "sub/MLproject": "x\n"}


@pytest.fixture
def archives(tmp_path: Path) -> Path:
    folder = tmp_path / "archives"
    folder.mkdir()
    (folder / "project.zip").write_bytes(zip_bytes(PROJECT_FILES))
    (folder / "slip.zip").write_bytes(zip_bytes({"MLproject": "x", "../escaped.txt": "gotcha"}))
    (folder / "abs.zip").write_bytes(zip_bytes({"MLproject": "x", "/tmp/abs-escape.txt": "x"}))
    (folder / "link.zip").write_bytes(zip_bytes({"MLproject": "x"}, symlink="passwd"))
    with tarfile.open(folder / "project.tar.gz", "w:gz") as tf:
        for name, text in PROJECT_FILES.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith(".sh") else 0o644
            tf.addfile(info, io.BytesIO(data))
    return folder


async def check_project_tree(directory: Path) -> None:
    def check() -> None:
        assert (directory / "MLproject").read_text() == "name: zipped\n"
        assert os.access(directory / "run.sh", os.X_OK)
        assert not os.access(directory / "MLproject", os.X_OK)

    await inspect(check)


async def test_local_zip_extracted_once(archives: Path, cache_root: Path) -> None:
    cache = SourceCache()
    fetched = await cache.fetch(str(archives / "project.zip"))
    assert fetched.directory.parent == cache_root / "archives"
    assert fetched.source_name == str(archives / "project.zip")
    assert (fetched.git_commit, fetched.git_repo_url, fetched.git_branch) == (None, None, None)
    await check_project_tree(fetched.directory)
    again = await cache.fetch((archives / "project.zip").as_uri() + "#sub")
    assert again.directory == fetched.directory / "sub"
    assert len(await inspect(lambda: entries(cache_root, "archives"))) == 1


async def test_local_tar_gz(archives: Path) -> None:
    fetched = await SourceCache().fetch(str(archives / "project.tar.gz"))
    await check_project_tree(fetched.directory)


@pytest.fixture
def files(archives: Path) -> Iterator[FileServer]:
    with FileServer(archives) as server:
        yield server


async def test_zip_over_http(files: FileServer, cache_root: Path) -> None:
    async with SourceCache() as cache:
        fetched = await cache.fetch(files.url("project.zip") + "#sub")
        assert fetched.source_name == files.url("project.zip") + "#sub"
        assert fetched.directory.name == "sub"
        await check_project_tree(fetched.directory.parent)
        again = await cache.fetch(files.url("project.zip"))
        assert again.directory == fetched.directory.parent
    # without entering the cache: a short-lived client
    assert (await SourceCache().fetch(files.url("project.zip"))).directory == again.directory
    assert files.count("GET") == 3
    with pytest.raises(SourceError) as caught:
        await SourceCache().fetch(files.url("missing.zip"))
    assert str(caught.value).startswith("Unable to retrieve ZIP file. Reason: HTTP 404")
    assert await inspect(lambda: temp_leftovers(cache_root)) == []


async def test_cancelled_download_leaves_nothing(files: FileServer, cache_root: Path) -> None:
    files.delay = 0.6
    with anyio.move_on_after(0.2) as scope:
        await SourceCache().fetch(files.url("project.zip"))
    assert scope.cancelled_caught
    assert await inspect(lambda: temp_leftovers(cache_root)) == []
    assert await inspect(lambda: entries(cache_root, "archives")) == []


async def test_zip_download_unreachable() -> None:
    url = f"http://user:{TOKEN}@127.0.0.1:{closed_port()}/p.zip"
    with pytest.raises(SourceError, match=r"Unable to retrieve ZIP file\. Reason: ") as caught:
        await SourceCache().fetch(url)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("slip.zip", "member '../escaped.txt' would be written outside the target"),
        ("abs.zip", "member '/tmp/abs-escape.txt' would be written outside the target"),
        ("link.zip", "member 'passwd' is a symbolic link"),
    ],
)
async def test_unsafe_zip_rejected(
    archives: Path, cache_root: Path, name: str, message: str
) -> None:
    with pytest.raises(SourceError, match=message):
        await SourceCache().fetch(str(archives / name))

    def nothing_written() -> None:
        assert entries(cache_root, "archives") == []
        assert temp_leftovers(cache_root) == []
        assert not (archives.parent / "escaped.txt").exists()
        assert not (cache_root / "tmp" / "escaped.txt").exists()

    await inspect(nothing_written)


async def test_archive_size_limit(
    archives: Path, files: FileServer, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOPROJ_MAX_ARCHIVE_BYTES", "10")
    with pytest.raises(SourceError, match="over the limit of 10 bytes"):
        await SourceCache().fetch(str(archives / "project.zip"))
    with pytest.raises(SourceError, match="over the limit"):
        await SourceCache().fetch(files.url("project.zip"))
    assert await inspect(lambda: entries(cache_root, "archives")) == []


async def test_corrupt_zip(tmp_path: Path) -> None:
    await inspect(lambda: (tmp_path / "bad.zip").write_bytes(b"not a zip"))
    with pytest.raises(SourceError, match="Cannot extract the archive"):
        await SourceCache().fetch(str(tmp_path / "bad.zip"))
