"""Local project directories: used in place, never modified.

Without a version, the directory itself is the work dir, and when it lies inside a git
repository the tags describe that repository's HEAD. With a version, the directory must be
inside a git repository; the commit the version names is exported (its tree written out,
as ``git archive`` would) into the cache, and that copy is the work dir. The user's working
tree, index and HEAD are never touched.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import anyio.from_thread

from aioproj.errors import SourceError
from aioproj.project.spec import find_mlproject
from aioproj.sources._store import CacheDir, FetchedProject, find_subdirectory, in_thread
from aioproj.sources.uri import ProjectURI, is_file_uri, redact_url

if TYPE_CHECKING:  # dulwich is imported where a git repository is found
    from dulwich.object_store import BaseObjectStore
    from dulwich.objects import ObjectID
    from dulwich.repo import Repo

__all__ = ["fetch_local", "safe_tree_path", "write_tree"]

VERSION_NEEDS_GIT = "Setting a version is only supported for Git project URIs"


@dataclass(frozen=True)
class _RepoInfo:
    """What the tags need to know about the git repository around a directory."""

    root: Path
    commit: str | None
    remote_url: str | None


@dataclass(frozen=True)
class _Export:
    """A version of a local repository, resolved to a commit."""

    info: _RepoInfo
    commit: str
    branch: str | None
    relative: PurePosixPath


def _first_remote_url(repo: Repo) -> str | None:
    config = repo.get_config()
    for section in config.sections():
        if len(section) == 2 and section[0] == b"remote":
            try:
                url = config.get(section, b"url")
            except KeyError:
                continue
            return redact_url(url.decode("utf-8", "replace"))
    return None


def _head_commit(repo: Repo) -> str | None:
    try:
        return repo.head().decode("ascii")
    except KeyError:
        return None  # a repository without commits


def _may_be_in_repository(path: Path) -> bool:
    """Whether ``path`` or a folder above it holds ``.git`` or is a bare repository, the
    places dulwich's ``Repo.discover`` looks: a few ``stat`` calls, so that a project
    outside git does not import dulwich at all."""
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return True
        if (folder / "objects").is_dir() and (folder / "refs").is_dir():
            return True
    return False


def _discover(path: Path) -> Repo | None:
    if not _may_be_in_repository(path):
        return None
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    try:
        return Repo.discover(str(path))
    except NotGitRepository:
        return None


def _repo_info(repo: Repo) -> _RepoInfo:
    return _RepoInfo(Path(repo.path).resolve(), _head_commit(repo), _first_remote_url(repo))


def _inspect(path: Path) -> _RepoInfo | None:
    """The git repository containing ``path``, if any (blocking)."""
    repo = _discover(path)
    if repo is None:
        return None
    with repo:
        return _repo_info(repo)


def _source_name(work_dir: Path, info: _RepoInfo | None) -> str:
    """``file://<repo root>#<subdir>`` inside a repository, else the absolute path."""
    if info is None:
        return str(work_dir)
    relative = work_dir.relative_to(info.root) if work_dir.is_relative_to(info.root) else None
    if relative is None:
        return str(work_dir)
    name = f"file://{info.root}"
    return name if relative == Path() else f"{name}#{relative.as_posix()}"


def _is_bare_repository(path: Path) -> bool:
    """A git repository without a working tree: ``HEAD``, ``objects/`` and ``refs/``."""
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def _has_mlproject(path: Path) -> bool:
    return find_mlproject(os.listdir(path), directory=path, is_file=Path.is_file) is not None


def _use_in_place(path: Path, project: ProjectURI) -> FetchedProject:
    """The blocking part of a fetch without version."""
    if not path.is_dir():
        raise SourceError(
            f"The project path {path} is not a directory. Give a project directory, "
            "a .zip or .tar.gz archive, or a git URL."
        )
    work_dir = find_subdirectory(path, project.subdir, str(path))
    if _is_bare_repository(work_dir) and not _has_mlproject(work_dir):
        raise SourceError(
            f"No MLproject was found in {work_dir}: it is a bare git repository, which has "
            "no working tree to run. Give a version to run one of its commits (-v BRANCH, "
            "TAG or COMMIT; version=... in aioproj.run), or run a clone of it."
        )
    info = _inspect(work_dir)
    return FetchedProject(
        directory=work_dir,
        uri=project.uri,
        source_name=_source_name(work_dir, info),
        git_commit=info.commit if info else None,
        git_repo_url=info.remote_url if info else None,
    )


def _is_branch(repo: Repo, version: str) -> bool:
    from dulwich.refs import Ref

    return Ref(b"refs/heads/" + version.encode()) in repo.refs


def _open_root(path: Path) -> Repo | None:
    """The git repository whose root is ``path``, if it has a branch (blocking).

    MLflow's ``_is_git_repo`` rule: ``git.Repo(path)`` (no search upwards) with at least
    one branch. A directory inside a repository is not one.
    """
    from dulwich.errors import NotGitRepository
    from dulwich.refs import Ref
    from dulwich.repo import Repo

    try:
        repo = Repo(str(path))
    except NotGitRepository:
        return None
    if not repo.refs.keys(base=Ref(b"refs/heads/")):
        repo.close()
        return None
    return repo


def _resolve_version(path: Path, version: str) -> _Export:
    """Open the repository rooted at ``path``; find the commit ``version`` names (blocking).

    Raises:
        SourceError: ``path`` is not the root of a git repository with a branch (MLflow's
            "Setting a version is only supported for Git project URIs"), or the version
            names no commit in it.
    """
    from dulwich.objectspec import parse_commit

    repo = _open_root(path)
    if repo is None:
        raise SourceError(
            f"{VERSION_NEEDS_GIT}: {path} is not the root of a git repository with a"
            " branch. Give the repository's root (add #subdir for a project inside it)."
        )
    with repo:
        info = _repo_info(repo)
        try:
            commit = parse_commit(repo, version).id.decode("ascii")
        except Exception as exc:
            raise SourceError(
                f"Unable to checkout version '{version}' of git repo {info.root} - "
                "please ensure that the version exists in the repo."
            ) from exc
        relative = PurePosixPath(path.relative_to(info.root).as_posix())
        return _Export(info, commit, version if _is_branch(repo, version) else None, relative)


def safe_tree_path(raw: bytes) -> PurePosixPath:
    """A git tree path as a relative path.

    Raises:
        SourceError: the path is absolute or has a ``..``, ``.git`` or empty part.
    """
    path = PurePosixPath(os.fsdecode(raw))
    if path.is_absolute() or any(part in {"..", ".git", ""} for part in path.parts):
        raise SourceError(f"Refusing to write the unsafe path {path} found in a git tree.")
    return path


def _write_entry(store: BaseObjectStore, sha: ObjectID, mode: int, target: Path) -> None:
    from dulwich.objects import Blob

    blob = store[sha]
    assert isinstance(blob, Blob)
    target.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(mode):
        os.symlink(os.fsdecode(blob.as_raw_string()), target)
        return
    target.write_bytes(blob.as_raw_string())
    target.chmod(0o755 if mode & 0o111 else 0o644)


def write_tree(store: BaseObjectStore, tree: ObjectID, dest: Path) -> None:
    """Write the files of a git tree under ``dest`` (blocking; stops when cancelled).

    Submodule entries become empty directories. Raises SourceError on an unsafe path and
    ``CancelledError`` when the awaiting task was cancelled.
    """
    from dulwich.objects import S_ISGITLINK

    dest.mkdir(parents=True, exist_ok=True)
    for entry in store.iter_tree_contents(tree):
        anyio.from_thread.check_cancelled()
        assert entry.path is not None
        assert entry.mode is not None
        assert entry.sha is not None
        target = dest / safe_tree_path(entry.path)
        if S_ISGITLINK(entry.mode):
            target.mkdir(parents=True, exist_ok=True)
        else:
            _write_entry(store, entry.sha, entry.mode, target)


def _export(repo_root: Path, commit: str, dest: Path) -> None:
    from dulwich.objectspec import parse_commit
    from dulwich.repo import Repo

    with Repo(str(repo_root)) as repo:
        tree = parse_commit(repo, commit).tree
        write_tree(repo.object_store, tree, dest)


async def _export_cached(cache: CacheDir, export: _Export) -> Path:
    """The cache entry holding the exported commit, built once (single-flight)."""
    repo_key = hashlib.sha256(str(export.info.root).encode()).hexdigest()[:32]
    entry = cache.entry("local", repo_key, export.commit)
    if await cache.exists(entry):
        return entry
    async with cache.locks.hold(str(entry)):
        if await cache.exists(entry):
            return entry
        async with cache.temp_dir("export-") as tmp:
            built = tmp / "tree"
            await in_thread(lambda: _export(export.info.root, export.commit, built))
            await cache.publish(built, entry)
    return entry


async def fetch_local(
    cache: CacheDir, project: ProjectURI, path: Path, version: str | None
) -> FetchedProject:
    """Fetch a local directory: in place, or an export of ``version`` into the cache.

    ``path`` must be absolute and exist. With a version it must be a repository's root,
    as in MLflow. Raises SourceError (not a directory, missing subdirectory, version
    without git repository root, unknown version). When cancelled, a half-written export
    is removed before ``CancelledError`` propagates.

    The ``mlflow.source.git.repoURL`` of a version is the repository's first remote; a
    repository without one gets the URI as given (a ``file://`` URI as written, a path
    made absolute), which is what MLflow records after adding that remote to it.
    """
    if version is None:
        return await in_thread(lambda: _use_in_place(path, project))
    export = await in_thread(lambda: _resolve_version(path, version))
    entry = await _export_cached(cache, export)
    base = entry / export.relative

    def locate() -> Path:
        return find_subdirectory(base, project.subdir, str(path))

    work_dir = await in_thread(locate)
    where = export.relative / project.subdir if project.subdir else export.relative
    source_name = f"file://{export.info.root}"
    if str(where) != ".":
        source_name += f"#{where.as_posix()}"
    return FetchedProject(
        directory=work_dir,
        uri=project.uri,
        source_name=source_name,
        git_commit=export.commit,
        git_repo_url=export.info.remote_url or _repo_url_as_given(project, path),
        git_branch=export.branch,
    )


def _repo_url_as_given(project: ProjectURI, path: Path) -> str:
    """The URI of a local repository as MLflow records it when the repository has no
    remote: the ``file://`` URI as written (before ``#``), else the path."""
    return redact_url(project.base) if is_file_uri(project.base) else str(path)
