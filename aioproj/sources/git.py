"""Git repositories over https, http, ssh, git and file URLs, with dulwich in worker threads.

A fetch first lists the remote's refs (ls-remote) to turn the version into a commit: no
version means the remote HEAD (default branch); otherwise a ref name, a branch, a tag, a
full or an abbreviated commit sha. The clone cache is keyed by the URL (without
credentials) and the commit: ``git/<sha256(url)>/<commit>``. An entry that exists is reused
without fetching anything; a full sha that is cached needs no network at all. Otherwise the
commit is fetched into a temp dir (depth 1 when the server advertises it, the whole
history when not), checked out, its submodules fetched recursively, and the result renamed
into place.

Credentials come from where git users keep them: ``https://user:token@host/...`` URLs,
``~/.git-credentials`` (the store helper's file), SSH keys and ``GIT_SSH_COMMAND``. They
never appear in messages, tags or the cached repository's config.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio.from_thread
import urllib3
from dulwich.client import (
    GitClient,
    HTTPUnauthorized,
    default_urllib3_manager,
    get_credentials_from_store,
    get_transport_and_path,
)
from dulwich.config import StackedConfig, read_submodules
from dulwich.errors import HangupException, NotGitRepository
from dulwich.objects import ObjectID
from dulwich.objectspec import parse_commit
from dulwich.refs import Ref
from dulwich.repo import Repo
from dulwich.submodule import iter_cached_submodules

from aioproj.errors import SourceError
from aioproj.sources._store import CacheDir, FetchedProject, find_subdirectory, in_thread
from aioproj.sources.local import safe_tree_path
from aioproj.sources.uri import (
    GIT_ALWAYS_ALLOWED,
    ProjectURI,
    check_git_url,
    check_submodule_url,
    redact_text,
    redact_url,
)

__all__ = ["fetch_git", "resolve_submodule_url"]

T = TypeVar("T")

_FULL_SHA = re.compile(r"^[0-9a-fA-F]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-fA-F]{4,39}$")
_HEAD = Ref(b"HEAD")
_PEELED = b"^{}"
_MAX_SUBMODULE_DEPTH = 8
# Per socket operation, not per fetch. It bounds how long a hung server can hold a worker
# thread (and so delay a cancellation, which waits for the thread's current step).
_HTTP_TIMEOUT = 120.0


@dataclass(frozen=True)
class _RemoteRefs:
    """The refs a remote advertises (name -> object sha, peeled tags included)."""

    refs: Mapping[bytes, bytes]
    head_branch: str | None

    def lookup(self, name: str) -> tuple[str, str] | None:
        """(object to ask for, commit it points to) for a ref name, or None."""
        ref = name.encode()
        if ref not in self.refs:
            return None
        want = self.refs[ref].decode("ascii")
        peeled = self.refs.get(ref + _PEELED)
        return want, peeled.decode("ascii") if peeled else want

    def advertises(self, sha: str) -> bool:
        return sha.encode("ascii") in set(self.refs.values())


@dataclass(frozen=True)
class _Wanted:
    """What to fetch for a version.

    ``want`` is the object to ask the server for (a tag object for annotated tags) and
    ``commit`` the commit to check out; both are None when only a full fetch can tell
    (an abbreviated or unadvertised sha, resolved from ``spec`` afterwards).
    """

    spec: str
    want: str | None
    commit: str | None
    branch: str | None


def _version_error(version: str | None, url: str) -> SourceError:
    return SourceError(
        f"Unable to checkout version '{version}' of git repo {redact_url(url)} - "
        "please ensure that the version exists in the repo."
    )


def _credential_files() -> list[str]:
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return [os.path.expanduser("~/.git-credentials"), os.path.join(xdg, "git", "credentials")]


def _stored_credentials(url: str) -> tuple[str | None, str | None]:
    """Credentials for an http(s) URL without userinfo, from git's credential store file."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or "@" in parts.netloc or not parts.hostname:
        return None, None
    found = get_credentials_from_store(parts.scheme, parts.hostname, fnames=_credential_files())
    return next(found, (None, None))


class _TrackingPoolManager(urllib3.PoolManager):
    """A pool manager that can close every response it handed out.

    dulwich leaves the response of a refused request (401, 404) open; closing them all when
    the client is done keeps sockets from leaking.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[Any] = []

    def urlopen(self, *args: Any, **kwargs: Any) -> Any:
        response = super().urlopen(*args, **kwargs)
        self.responses.append(response)
        return response


class _TrackingProxyManager(urllib3.ProxyManager):
    """:class:`_TrackingPoolManager` for connections through an HTTP proxy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[Any] = []

    def urlopen(self, *args: Any, **kwargs: Any) -> Any:
        response = super().urlopen(*args, **kwargs)
        self.responses.append(response)
        return response


def _connect(url: str) -> tuple[GitClient, str]:
    """A dulwich client for ``url`` configured as git would be (blocking)."""
    config = StackedConfig.default()
    username, password = _stored_credentials(url)
    ssh_command = os.environ.get("GIT_SSH_COMMAND") or os.environ.get("GIT_SSH")
    pool: urllib3.PoolManager | None = None
    if urlsplit(url).scheme in {"http", "https"}:
        pool = default_urllib3_manager(  # type: ignore[assignment]  # one of our classes
            config,
            pool_manager_cls=_TrackingPoolManager,
            proxy_manager_cls=_TrackingProxyManager,
            base_url=redact_url(url),
            timeout=_HTTP_TIMEOUT,
        )
    return get_transport_and_path(
        url,
        config=config,
        username=username,
        password=password,
        ssh_command=ssh_command,
        pool_manager=pool,
    )


def _close(client: GitClient) -> None:
    """Release the client's connections, including responses dulwich left open."""
    client.close()
    pool = getattr(client, "pool_manager", None)
    for response in getattr(pool, "responses", ()):
        response.close()
    if pool is not None:
        pool.clear()


def _network_error(exc: Exception, url: str) -> SourceError:
    shown = redact_url(url)
    if isinstance(exc, HTTPUnauthorized):
        return SourceError(
            f"Authentication failed for git repo {shown}. Give credentials in the URL "
            "(https://user:token@host/...), in ~/.git-credentials, or use an SSH URL."
        )
    if isinstance(exc, NotGitRepository):
        return SourceError(
            f"No git repository found at {shown}. Check the URL and that you have access."
        )
    reason = redact_text(str(exc) or type(exc).__name__, url)
    if isinstance(exc, HangupException):
        reason = f"the remote hung up ({reason})"
    return SourceError(
        f"Unable to fetch git repo {shown}: {reason}. Check that the URL is right, the "
        "host is reachable and your credentials are set."
    )


def _talk(url: str, action: Callable[[GitClient, str], T]) -> T:
    """Run one network exchange with the remote, translating failures (blocking).

    Raises:
        SourceError: any failure of the transport or the server, credentials redacted.
    """
    try:
        client, path = _connect(url)
    except Exception as exc:
        raise SourceError(f"Unsupported git URL {redact_url(url)}: {exc}") from None
    try:
        return action(client, path)
    except SourceError:
        raise
    except Exception as exc:
        error = _network_error(exc, url)
        cause = exc if redact_text(str(exc), url) == str(exc) else None
        raise error from cause
    finally:
        _close(client)


def _ls_remote(url: str) -> _RemoteRefs:
    """The refs of the remote (blocking)."""
    result = _talk(url, lambda client, path: client.get_refs(path.encode()))
    refs = {bytes(k): bytes(v) for k, v in result.refs.items() if v is not None}
    head = result.symrefs.get(_HEAD)
    branch = head.removeprefix(b"refs/heads/").decode() if head else None
    return _RemoteRefs(refs, branch)


def _resolve(remote: _RemoteRefs, version: str | None, url: str) -> _Wanted:
    """Turn a version into what to fetch, from the advertised refs alone.

    Raises:
        SourceError: the version names nothing the remote could have.
    """
    if version is None:
        head = remote.lookup("HEAD")
        if head is None:
            raise SourceError(
                f"Failed to find the HEAD branch of git repo {redact_url(url)}: the remote "
                "has no default branch. Pass a version (branch, tag or commit)."
            )
        return _Wanted("HEAD", head[0], head[1], None)
    branch = version if remote.lookup(f"refs/heads/{version}") else None
    for name in (version, f"refs/heads/{version}", f"refs/tags/{version}"):
        found = remote.lookup(name)
        if found is not None:
            return _Wanted(version, found[0], found[1], branch)
    wanted = _resolve_sha(remote, version)
    if wanted is None:
        raise _version_error(version, url)
    return wanted


def _resolve_sha(remote: _RemoteRefs, version: str) -> _Wanted | None:
    """A full or abbreviated commit sha: fetch just it when advertised, else everything."""
    sha = version.lower()
    if _FULL_SHA.match(sha) and remote.advertises(sha):
        return _Wanted(sha, sha, sha, None)
    if not (_FULL_SHA.match(sha) or _SHORT_SHA.match(sha)):
        return None
    matches = {ref_sha for ref_sha in remote.refs.values() if ref_sha.startswith(sha.encode())}
    if len(matches) == 1 and not _FULL_SHA.match(sha):
        commit = matches.pop().decode("ascii")
        return _Wanted(sha, commit, commit, None)
    return _Wanted(sha, None, None, None)


def resolve_submodule_url(parent: str, url: str) -> str:
    """A submodule URL, resolving ``./`` and ``../`` against the superproject's URL."""
    if not url.startswith(("./", "../")):
        return url
    if "://" in parent:
        parts = urlsplit(parent)
        path = posixpath.normpath(posixpath.join(parts.path.rstrip("/") + "/", url))
        return urlunsplit(parts._replace(path=path))
    host, sep, path = parent.rpartition(":") if "@" in parent else ("", "", parent)
    joined = posixpath.normpath(posixpath.join(path.rstrip("/") + "/", url))
    return f"{host}{sep}{joined}"


def _fetch_objects(url: str, repo: Repo, want: str | None) -> None:
    """Fetch ``want`` at depth 1, or every ref with full history when ``want`` is None."""

    def wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
        assert want is not None
        return [ObjectID(want.encode("ascii"))]

    if want is None:
        _talk(url, lambda client, path: client.fetch(path, repo))
    else:
        _talk(url, lambda client, path: client.fetch(path, repo, wants, depth=1))


def _find_commit(repo: Repo, spec: str) -> str | None:
    try:
        return parse_commit(repo, spec).id.decode("ascii")
    except Exception:
        return None


def _point_head(repo: Repo, commit: str, branch: str | None) -> None:
    """HEAD on a local branch named like the remote one, or detached at the commit."""
    if branch:
        local = Ref(b"refs/heads/" + branch.encode())
        repo.refs[local] = ObjectID(commit.encode("ascii"))
        repo.refs.set_symbolic_ref(_HEAD, local)
    else:
        Path(repo.controldir(), "HEAD").write_text(commit + "\n")


def _checkout(repo: Repo, commit: str, branch: str | None, url: str) -> None:
    _point_head(repo, commit, branch)
    config = repo.get_config()
    config.set((b"remote", b"origin"), b"url", redact_url(url).encode())
    config.set((b"remote", b"origin"), b"fetch", b"+refs/heads/*:refs/remotes/origin/*")
    config.write_to_path()
    tree = parse_commit(repo, commit).tree
    repo.get_worktree().reset_index(tree)


def _clone(url: str, dest: Path, wanted: _Wanted, depth: int = 0) -> str:
    """Fetch and check out one commit of ``url`` into ``dest``; returns the commit (blocking).

    Raises SourceError (network, unknown version, bad submodule) and ``CancelledError``
    at the next step after the awaiting task was cancelled.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with Repo.init(str(dest)) as repo:
        _fetch_objects(url, repo, wanted.want)
        anyio.from_thread.check_cancelled()
        commit = _find_commit(repo, wanted.commit or wanted.spec)
        if commit is None:
            raise _version_error(wanted.spec, url)
        _checkout(repo, commit, wanted.branch, url)
        anyio.from_thread.check_cancelled()
        _update_submodules(repo, dest, url, depth)
    return commit


def _update_submodules(repo: Repo, dest: Path, url: str, depth: int) -> None:
    """Clone every submodule listed in ``.gitmodules`` at its recorded commit (blocking)."""
    gitmodules = dest / ".gitmodules"
    if not gitmodules.is_file():
        return
    if depth >= _MAX_SUBMODULE_DEPTH:
        raise SourceError(f"Submodules of {redact_url(url)} nest deeper than {depth} levels.")
    urls = {path: sub_url for path, sub_url, _name in read_submodules(str(gitmodules))}
    tree = parse_commit(repo, repo.head()).tree
    allowed = _protocol_policy()
    wanted: list[tuple[str, bytes, str]] = []
    for path, sha in iter_cached_submodules(repo.object_store, tree):
        if path not in urls:
            continue
        sub_url = resolve_submodule_url(url, urls[path].decode())
        # .gitmodules comes from the repository: it may be hostile. Every URL is checked
        # before any submodule is fetched.
        check_git_url(sub_url)
        shown = path.decode("utf-8", "replace")
        check_submodule_url(sub_url, path=shown, superproject=url, allowed=allowed)
        wanted.append((sub_url, path, sha.decode("ascii")))
    for sub_url, path, commit in wanted:
        _clone_submodule(sub_url, dest / safe_tree_path(path), commit, depth + 1)


def _protocol_policy() -> Callable[[str], bool]:
    """Whether git would fetch a submodule over a transport (blocking: reads git config).

    As git decides it for submodules: ``GIT_ALLOW_PROTOCOL`` (a ``:``-separated list)
    when set, else ``protocol.<name>.allow`` then ``protocol.allow`` from the git config,
    where only ``always`` allows (``user`` does not: a submodule is not the user's
    choice), else git's defaults (:data:`GIT_ALWAYS_ALLOWED`).
    """
    listed = os.environ.get("GIT_ALLOW_PROTOCOL")
    if listed is not None:
        names = frozenset(listed.split(":"))
        return lambda transport: transport in names
    config = StackedConfig.default()

    def allowed(transport: str) -> bool:
        for section in ((b"protocol", transport.encode()), (b"protocol",)):
            try:
                value = config.get(section, b"allow")
            except KeyError:
                continue
            return bytes(value).strip().lower() == b"always"
        return transport in GIT_ALWAYS_ALLOWED

    return allowed


def _clone_submodule(url: str, dest: Path, commit: str, depth: int) -> None:
    remote = _ls_remote(url)
    want = commit if remote.advertises(commit) else None
    _clone(url, dest, _Wanted(commit, want, commit, None), depth)


def _url_key(url: str) -> str:
    return hashlib.sha256(redact_url(url).encode()).hexdigest()[:32]


def _cached_prefix(repo_dir: Path, prefix: str) -> Path | None:
    """The one cached commit of this repository starting with ``prefix`` (blocking)."""
    if not repo_dir.is_dir():
        return None
    found = [p for p in repo_dir.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return found[0] if len(found) == 1 else None


async def _lookup(cache: CacheDir, key: str, wanted: _Wanted) -> Path | None:
    if wanted.commit is not None:
        entry = cache.entry("git", key, wanted.commit)
        return entry if await cache.exists(entry) else None
    return await in_thread(lambda: _cached_prefix(cache.entry("git", key), wanted.spec))


async def _cached_or_clone(cache: CacheDir, url: str, wanted: _Wanted) -> Path:
    """The cache entry (named by its commit) for the wanted commit, cloned at most once."""
    key = _url_key(url)
    lock = f"git:{key}:{wanted.commit or wanted.spec}"
    async with cache.locks.hold(lock):
        entry = await _lookup(cache, key, wanted)
        if entry is not None:
            return entry
        async with cache.temp_dir("git-") as tmp:
            built = tmp / "repo"
            commit = await in_thread(lambda: _clone(url, built, wanted))
            entry = cache.entry("git", key, commit)
            await cache.publish(built, entry)
    return entry


async def _cached_full_sha(cache: CacheDir, url: str, version: str | None) -> Path | None:
    """The cached entry of a full-sha version: no need to ask the server anything."""
    if version is None or not _FULL_SHA.match(version):
        return None
    entry = cache.entry("git", _url_key(url), version.lower())
    return entry if await cache.exists(entry) else None


async def fetch_git(cache: CacheDir, project: ProjectURI, version: str | None) -> FetchedProject:
    """Fetch ``project.base`` at ``version`` through the clone cache.

    Raises SourceError for unreachable hosts, missing repositories, refused credentials,
    unknown versions and missing subdirectories, with credentials redacted, and for URLs
    (the project's or a submodule's) that could smuggle in options or commands. When cancelled,
    the partial clone is removed before ``CancelledError`` propagates (the fetch stops at
    the next step: the network exchange in progress is finished first).
    """
    url = project.base
    check_git_url(url)
    entry, branch = await _cached_full_sha(cache, url, version), None
    if entry is None:
        remote = await cache.shared.run(
            f"ls-remote {url}", lambda: in_thread(lambda: _ls_remote(url))
        )
        wanted = _resolve(remote, version, url)
        entry, branch = await _cached_or_clone(cache, url, wanted), wanted.branch
    base, shown = entry, redact_url(url)
    work_dir = await in_thread(lambda: find_subdirectory(base, project.subdir, shown))
    return FetchedProject(
        directory=work_dir,
        uri=project.uri,
        source_name=redact_url(project.uri),
        git_commit=entry.name,
        git_repo_url=shown,
        git_branch=branch,
    )
