"""The one redaction path: what takes credentials out of text before anyone sees it.

Every place a URI or another user value can reach goes through here: error messages
(:class:`aioproj.AioprojError` redacts its arguments), log records (a filter on every
``aioproj`` logger), warnings (:func:`warn`), tracking records (tags, params and run
names, :func:`aioproj.tracking.base.check_record`) and reprs. Two kinds of secret are
removed:

- credentials written into a URL (``https://user:token@host``): found in any text by
  their shape, whatever the URL, so a message quoting a value it does not know to be a
  URL is cleaned too (:func:`redact_credentials`);
- secrets known by value (a token, a password, an OAuth client secret): replaced wherever
  they appear (:func:`scrub`).

Pure functions, no I/O; they never fail, whatever the text.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from urllib.parse import quote, unquote

__all__ = [
    "MASK",
    "RedactingFilter",
    "install_log_redaction",
    "redact",
    "redact_credentials",
    "redact_text",
    "redact_url",
    "scrub",
    "warn",
]

#: What a removed secret is replaced with.
MASK = "***"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
# ``scheme://userinfo@`` anywhere in a text. The userinfo ends at the last ``@`` before a
# ``/``, ``?``, ``#`` or whitespace, as urlsplit ends the authority (a password may hold
# an unencoded ``@``).
_USERINFO_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#]*)@")


def _userinfo(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, userinfo, @host..., rest)`` of a URL with a userinfo, else None.

    Split as :func:`urllib.parse.urlsplit` splits (the authority ends at the first ``/``,
    ``?`` or ``#``; the userinfo at its last ``@``), but textually, so a URL that urlsplit
    refuses (``https://user:pw@[::1/x``) is split too.
    """
    head, sep, tail = url.partition("://")
    if not sep or _SCHEME.match(head) is None:
        return None
    cut = re.search(r"[/?#]", tail)
    authority, rest = (tail[: cut.start()], tail[cut.start() :]) if cut else (tail, "")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return None
    return head + sep, userinfo, at + hostport, rest


def _is_http(scheme: str) -> bool:
    """``http://``, ``https://`` and pip's ``git+https://``: a user there is often a token."""
    name = scheme.lower().removesuffix("://").rpartition("+")[2]
    return name in ("http", "https")


def _kept_user(scheme: str, userinfo: str) -> str:
    """What of a userinfo may be shown: the user of a non-http URL (``ssh://git@``)."""
    user = userinfo.partition(":")[0]
    return f"{user}@" if user and not _is_http(scheme) else ""


def redact_url(url: str) -> str:
    """The URL without the credentials embedded in it; never fails, whatever the string.

    For http(s) (and ``git+https``) the whole userinfo goes (a token is often passed as
    the user name); for other schemes only the password goes, so ``ssh://git@host/x``
    keeps its user. A URL that is not well formed (``https://user:pw@[::1/x``) loses its
    credentials too.
    """
    split = _userinfo(url)
    if split is None:
        return url
    scheme, userinfo, hostport, rest = split
    return f"{scheme}{_kept_user(scheme, userinfo)}{hostport[1:]}{rest}"


def _userinfo_secrets(url: str) -> list[str]:
    """The secrets embedded in a URL, raw, percent-decoded and re-encoded."""
    split = _userinfo(url)
    if split is None:
        return []
    scheme, userinfo, _, _ = split
    user, colon, password = userinfo.partition(":")
    raw = [password] if colon else []
    if _is_http(scheme):
        raw.append(user)
    secrets = [s for s in raw if s]
    decoded = [unquote(s) for s in secrets]
    return [s for s in dict.fromkeys(secrets + decoded + [quote(s, safe="") for s in decoded]) if s]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every (non-empty) secret replaced by ``***``, longest first."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_text(text: str, url: str) -> str:
    """``text`` with the URL redacted and its embedded credentials replaced by ``***``
    wherever else they appear (an error quoting the password alone, percent-decoded)."""
    return scrub(text.replace(url, redact_url(url)), _userinfo_secrets(url))


def _without_userinfo(found: re.Match[str]) -> str:
    scheme, userinfo = found.group(1), found.group(2)
    return f"{scheme}{_kept_user(scheme, userinfo)}"


def redact_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it removed, as :func:`redact_url`
    removes them (``https://user:pw@host`` becomes ``https://host``)."""
    if "://" not in text or "@" not in text:
        return text
    return _USERINFO_IN_TEXT.sub(_without_userinfo, text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without URL credentials and without any of ``secrets``."""
    return scrub(redact_credentials(text), secrets)


class RedactingFilter(logging.Filter):
    """A logging filter that formats a record's message and removes URL credentials.

    The record keeps its level and logger; its ``msg`` becomes the redacted message and
    ``args`` are dropped (they are in the message now).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself on emit
            return True
        cleaned = redact_credentials(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, ()
        return True


_FILTER = RedactingFilter()

#: The loggers aioproj logs to. A filter on a logger applies to records logged on that
#: very logger (not its children), so each gets one; a test checks the list is complete.
LOGGER_NAMES = (
    "aioproj",
    "aioproj.backends.local",
    "aioproj.envs",
    "aioproj.databricks",
    "aioproj.kubernetes",
    "aioproj.slurm",
    "aioproj.tracking",
    "aioproj.testing.databricks",
)


def install_log_redaction() -> None:
    """Put :class:`RedactingFilter` on every aioproj logger (idempotent)."""
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """:func:`warnings.warn` with URL credentials removed from the message.

    ``stacklevel`` counts from the caller of this function, as it would for
    :func:`warnings.warn` called there.
    """
    warnings.warn(redact_credentials(message), category, stacklevel=stacklevel + 1)
