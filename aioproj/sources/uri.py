"""Pure parsing of project URIs: no I/O, no network.

A project URI is a local path, a ``file://`` URI, an archive (``.zip``, ``.tar.gz``,
``.tgz``, ``.tar``) or a git URL, optionally followed by ``#subdir``. These functions
classify and split such strings; deciding between "local path" and "git URL" also needs to
know whether the path exists, which the fetchers check in a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from aioproj.errors import SourceError

__all__ = [
    "ArchiveKind",
    "ProjectURI",
    "archive_kind",
    "check_git_url",
    "file_uri_to_path",
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
_GIT_SCHEMES = frozenset({"http", "https", "ssh", "git", "git+ssh", "ssh+git", "file"})
_ARCHIVE_SUFFIXES: tuple[tuple[str, ArchiveKind], ...] = (
    (".zip", "zip"),
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".tar.bz2", "tar"),
    (".tar.xz", "tar"),
    (".tar", "tar"),
)


@dataclass(frozen=True)
class ProjectURI:
    """A project URI split into the part to fetch and the subdirectory to run in.

    ``uri`` is the URI as given with surrounding quotes stripped, ``base`` is everything
    before the first ``#`` and ``subdir`` everything after it (``""`` when there is none).
    """

    uri: str
    base: str
    subdir: str


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
        SourceError: the URI is empty or its subdirectory contains a ``.``.
    """
    stripped = strip_quotes(uri.strip())
    if not stripped:
        raise SourceError("The project URI is empty: give a local path, an archive or a git URL.")
    base, subdir = split_subdirectory(stripped)
    return ProjectURI(uri=stripped, base=base, subdir=subdir)


def is_file_uri(uri: str) -> bool:
    """True for ``file://...`` URIs."""
    return _FILE_URI.match(uri) is not None


def file_uri_to_path(uri: str) -> str:
    """The local path a ``file://`` URI names (``file://localhost/x`` and ``file:///x``)."""
    parts = urlsplit(uri)
    netloc = "" if parts.netloc == "localhost" else parts.netloc
    return unquote(netloc + parts.path)


def local_path_of(base: str) -> str:
    """The path to look for on disk: the path of a ``file://`` URI, else ``base`` itself."""
    return file_uri_to_path(base) if is_file_uri(base) else base


def is_http_uri(uri: str) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return urlsplit(uri).scheme.lower() in {"http", "https"}


def archive_kind(uri: str) -> ArchiveKind | None:
    """``"zip"`` or ``"tar"`` when the URI (its path, without query) names an archive."""
    path = urlsplit(uri).path if "://" in uri else uri
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
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
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


def looks_like_local_path(uri: str) -> bool:
    """True when a string is meant as a path: ``/x``, ``./x``, ``../x``, ``~x`` or no ``:``."""
    return uri.startswith(("/", "./", "../", "~")) or ":" not in uri


def _userinfo_secrets(url: str) -> list[str]:
    """The secrets embedded in a URL, raw and percent-decoded (as :func:`redact_url` drops)."""
    try:
        parts = urlsplit(url)
        raw = [parts.password]
        if parts.scheme.lower() in {"http", "https"}:
            raw.append(parts.username)
    except ValueError:
        return []
    secrets = [s for s in raw if s]
    decoded = [unquote(s) for s in secrets]
    return [s for s in dict.fromkeys(secrets + decoded + [quote(s, safe="") for s in decoded]) if s]


def redact_url(url: str) -> str:
    """The URL without the credentials embedded in it.

    For http(s) the whole userinfo goes (a token is often passed as the user name); for
    other schemes only the password goes, so ``ssh://git@host/x`` keeps its user.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return url
    if "@" not in parts.netloc or host is None:
        return url
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if parts.scheme.lower() not in {"http", "https"} and parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str, url: str) -> str:
    """``text`` with the URL's embedded credentials replaced by ``***``."""
    text = text.replace(url, redact_url(url))
    for secret in sorted(_userinfo_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
