"""Pure parsing of project URIs: no I/O, no network.

A project URI is a local path, a ``file://`` URI, an archive (``.zip``, ``.tar.gz``,
``.tgz``, ``.tar``) or a git URL, optionally followed by ``#subdir``. These functions
classify and split such strings; deciding between "local path" and "git URL" also needs to
know whether the path exists, which the fetchers check in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from aioproj._redact import redact_text, redact_url
from aioproj.errors import SourceError

__all__ = [
    "GIT_ALWAYS_ALLOWED",
    "ArchiveKind",
    "ProjectURI",
    "archive_kind",
    "check_git_url",
    "check_submodule_url",
    "check_well_formed",
    "file_uri_to_path",
    "git_transport",
    "is_file_uri",
    "is_git_uri",
    "is_http_uri",
    "is_zip_uri",
    "local_path_of",
    "looks_like_local_path",
    "parse_project_uri",
    "redact_text",
    "redact_url",
    "split_subdirectory",
    "strip_quotes",
]

ArchiveKind = Literal["zip", "tar"]

_FILE_URI = re.compile(r"^file://.+")
_SCP_LIKE = re.compile(r"^[\w.+-]+@[\w.-]+:(?!//)")
# git's remote-helper syntax (``ext::<command>``, ``fd::<n>``, ``<transport>::<address>``).
_REMOTE_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# ``scheme://authority``: what :func:`_path_of` drops from a URL urlsplit refuses.
_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_GIT_SCHEMES = frozenset({"http", "https", "ssh", "git", "git+ssh", "ssh+git", "file"})
_ARCHIVE_SUFFIXES: tuple[tuple[str, ArchiveKind], ...] = (
    (".zip", "zip"),
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".tar.bz2", "tar"),
    (".tar.xz", "tar"),
    (".tar", "tar"),
)


@dataclass(frozen=True, repr=False)
class ProjectURI:
    """A project URI split into the part to fetch and the subdirectory to run in.

    ``uri`` is the URI as given with surrounding quotes stripped, ``base`` is everything
    before the first ``#`` and ``subdir`` everything after it (``""`` when there is none).
    Its ``repr`` shows the URI without credentials.
    """

    uri: str
    base: str
    subdir: str

    def __repr__(self) -> str:
        return f"ProjectURI({redact_url(self.uri)!r})"


def strip_quotes(uri: str) -> str:
    """Remove the ``'`` and ``"`` characters that surround a URI pasted from a shell."""
    return uri.strip("'\"")


def split_subdirectory(uri: str) -> tuple[str, str]:
    """Split ``base#subdir`` at the first ``#``.

    Raises:
        SourceError: the subdirectory contains a ``.`` (which rules out ``..`` escapes).
    """
    base, _, subdir = uri.partition("#")
    if "." in subdir:
        raise SourceError("'.' is not allowed in project subdirectory paths.")
    return base, subdir.strip("/")


def parse_project_uri(uri: str) -> ProjectURI:
    """Strip quotes and split off ``#subdir``.

    Raises:
        SourceError: the URI is empty, its subdirectory contains a ``.``, or it has a
            scheme (``://``) but is not a well-formed URL (an unclosed or empty ``[host]``,
            a port that is not a number from 0 to 65535).
    """
    stripped = strip_quotes(uri.strip())
    if not stripped:
        raise SourceError("The project URI is empty: give a local path, an archive or a git URL.")
    base, subdir = split_subdirectory(stripped)
    if "://" in base:
        check_well_formed(base)
    return ProjectURI(uri=stripped, base=base, subdir=subdir)


def check_well_formed(url: str) -> None:
    """Refuse a URL that :func:`urllib.parse.urlsplit` cannot take apart.

    Raises:
        SourceError: the host is a bracketed IPv6 address that is unclosed, empty or
            invalid (``http://[::1``, ``https://[]/x``), or the port is not a number from 0
            to 65535; the message shows the URL without its credentials.
    """
    try:
        parts = urlsplit(url)
        _ = parts.hostname, parts.port
    except ValueError as exc:
        raise SourceError(
            f"The project URI {redact_url(url)!r} is not a well-formed URL ({exc}). "
            "Check the host (an IPv6 address goes in brackets: http://[::1]:8080/) and the port."
        ) from None


def _scheme(uri: str) -> str:
    """The URI's scheme, lowercased (``""`` for none); never fails, whatever the string."""
    found = _SCHEME.match(uri)
    return found.group(1).lower() if found else ""


def _path_of(uri: str) -> str:
    """The path part of a URL (after scheme and host, before ``?``/``#``); never fails."""
    try:
        return urlsplit(uri).path
    except ValueError:
        rest = _AUTHORITY.sub("", uri, count=1)
        return re.split(r"[?#]", rest, maxsplit=1)[0]


def is_file_uri(uri: str) -> bool:
    """True for ``file://...`` URIs."""
    return _FILE_URI.match(uri) is not None


def file_uri_to_path(uri: str) -> str:
    """The local path a ``file://`` URI names (``file://localhost/x`` and ``file:///x``).

    A URI :func:`urllib.parse.urlsplit` refuses (``file://[x``) names the path after
    ``file://``, which does not exist, so the caller says so.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return unquote(uri.partition("://")[2])
    netloc = "" if parts.netloc == "localhost" else parts.netloc
    return unquote(netloc + parts.path)


def local_path_of(base: str) -> str:
    """The path to look for on disk: the path of a ``file://`` URI, else ``base`` itself."""
    return file_uri_to_path(base) if is_file_uri(base) else base


def is_http_uri(uri: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return _scheme(uri) in {"http", "https"}


def archive_kind(uri: str) -> ArchiveKind | None:
    """``"zip"`` or ``"tar"`` when the URI (its path, without query) names an archive."""
    path = _path_of(uri) if "://" in uri else uri
    lowered = path.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            return kind
    return None


def is_zip_uri(uri: str) -> bool:
    """True when the URI names a ``.zip`` archive."""
    return archive_kind(uri) == "zip"


def is_git_uri(uri: str) -> bool:
    """True for URLs git can fetch: http(s), ssh, git, file and scp-like ``user@host:path``."""
    if _SCP_LIKE.match(uri):
        return True
    scheme = _scheme(uri) if "://" in uri else ""
    return scheme in _GIT_SCHEMES


def check_git_url(url: str) -> None:
    """Refuse a git URL that could make git, ssh or a remote helper run something else.

    It is checked before anything is fetched, for a project's URL and for every submodule
    URL a repository's ``.gitmodules`` names.

    Raises:
        SourceError: the URL uses git's remote-helper syntax (``ext::``, ``fd::``), holds a
            control character (a newline, NUL), or its host, user or path begins with
            ``-`` (which ssh and git would read as a command-line option, e.g.
            ``ssh://-oProxyCommand=...`` or ``--upload-pack=...``).
    """
    shown = redact_url(url)
    if _REMOTE_HELPER.match(url):
        raise SourceError(
            f"Refusing git URL {shown!r}: remote helpers ('<transport>::<address>', such as "
            "ext::) can run commands. Use an https, ssh, git or file URL."
        )
    if _CONTROL.search(url):
        raise SourceError(
            f"Refusing git URL {shown!r}: it contains a control character (newline, tab or NUL)."
        )
    parts = _git_url_parts(url)
    if parts is None:
        raise SourceError(f"Refusing git URL {shown!r}: it is not a well-formed URL.")
    for part in parts:
        if part.startswith("-"):
            raise SourceError(
                f"Refusing git URL {shown!r}: {part!r} begins with '-', which git or ssh "
                "would read as a command-line option."
            )


def _git_url_parts(url: str) -> tuple[str, ...] | None:
    """The user, host and path of a git URL (scp-like or with a scheme); None if malformed."""
    if "://" in url:
        try:
            parts = urlsplit(url)
            host, user = parts.hostname or "", parts.username or ""
        except ValueError:
            return None
        return user, host, parts.path.lstrip("/") if parts.scheme == "file" else parts.path
    if _SCP_LIKE.match(url):
        address, _, path = url.partition(":")
        user, _, host = address.rpartition("@")
        return user, host, path
    return (url,)


#: The transports git allows anywhere by default, submodules included (git-config
#: ``protocol.allow``). ``file`` is ``user`` since git 2.38.1: a submodule may not use it.
GIT_ALWAYS_ALLOWED = frozenset({"http", "https", "ssh", "git"})
_SSH_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git"})


def git_transport(url: str) -> str:
    """The transport a git URL names, as git names it in ``protocol.<name>.allow``.

    ``file`` for ``file://`` URLs and local paths (``/srv/repo``, ``../x``, ``repo``),
    ``ssh`` for ``ssh://`` and scp-like ``[user@]host:path``, else the scheme.
    """
    if "://" in url:
        scheme = _scheme(url)
        return "ssh" if scheme in _SSH_SCHEMES else scheme or "file"
    if looks_like_local_path(url):
        return "file"
    return "ssh"


def check_submodule_url(
    url: str, *, path: str, superproject: str, allowed: Callable[[str], bool]
) -> None:
    """Refuse a submodule URL whose transport git would refuse for this superproject.

    A remote repository names its submodules in ``.gitmodules``; git fetches them only
    over the transports ``allowed`` says (``protocol.<name>.allow``, by default
    :data:`GIT_ALWAYS_ALLOWED`), so a repository served over https cannot make it read a
    local repository (``url = /srv/private``) and ship its files with the project. A
    superproject that is itself local may name local submodules.

    Raises:
        SourceError: the URL's transport is not allowed; the message names the submodule,
            its URL and the superproject (without credentials) and how to allow it.
    """
    transport = git_transport(url)
    if allowed(transport) or git_transport(superproject) == "file":
        return
    raise SourceError(
        f"Refusing submodule {path!r} of {redact_url(superproject)}: its URL "
        f"{redact_url(url)!r} uses the {transport!r} transport, which git does not allow for "
        f"the submodules of a remote repository (protocol.{transport}.allow; 'file' since "
        "git 2.38.1): it would read a repository of this machine into the project. If you "
        f"trust it: git config --global protocol.{transport}.allow always"
    )


def looks_like_local_path(uri: str) -> bool:
    """True when a string is meant as a path: ``/x``, ``./x``, ``../x``, ``~x`` or no ``:``."""
    return uri.startswith(("/", "./", "../", "~")) or ":" not in uri
