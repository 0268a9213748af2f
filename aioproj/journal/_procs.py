"""Finding and stopping the processes of a dead driver, by their mark (Linux ``/proc``).

Every process aioproj starts carries ``AIOPROJ_RUN_MARK=<journal id>/<key>`` in its
environment, and so does everything it starts in turn (see :mod:`aioproj._marks`). A
scan of ``/proc/*/environ`` finds them all, whichever process group or session they are
in, including processes whose pid never reached the journal.

Signals go through pidfds: a pidfd pins its process, so the pid checked for the mark is
the pid signalled, even if the process exits and its pid is reused in between. Every
function here blocks (reads ``/proc``, sleeps): call them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Collection, Iterable

from aioproj._marks import MARK_VARIABLE

__all__ = ["find_marked", "stop_marked"]

_PREFIX = MARK_VARIABLE.encode() + b"="


def _mark_of(pid: int) -> str | None:
    """The aioproj mark in the environment of ``pid``, if it has one (and we may read it)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(_PREFIX):
            return item[len(_PREFIX) :].decode("ascii", "replace")
    return None


def find_marked(journal_ids: Collection[str]) -> dict[str, list[int]]:
    """Live processes whose mark names one of ``journal_ids``: mark -> pids.

    Zombies have no environment left and are not listed (nothing to stop). Without
    ``/proc`` (not Linux) the answer is empty.
    """
    if not journal_ids or not sys.platform.startswith("linux"):
        return {}
    wanted = {f"{journal_id}/" for journal_id in journal_ids}
    me = os.getpid()
    found: dict[str, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        mark = _mark_of(int(name))
        if mark is None:
            continue
        prefix, sep, _ = mark.partition("/")
        if sep and f"{prefix}/" in wanted:
            found.setdefault(mark, []).append(int(name))
    return found


def _pin(pid: int, mark: str) -> int | None:
    """A pidfd of ``pid`` if it still carries ``mark``; None if it is gone or not ours."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    if _mark_of(pid) != mark:  # exited and the pid reused before the pidfd pinned it
        os.close(fd)
        return None
    return fd


def _alive(pidfd: int) -> bool:
    """A pidfd turns readable when its process exits."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return not readable


def stop_marked(processes: Iterable[tuple[str, int]], grace_period: float) -> int:
    """SIGTERM every ``(mark, pid)`` still carrying its mark, SIGKILL what is left after
    ``grace_period``; return how many were signalled. Returns once all have exited."""
    pinned = [fd for mark, pid in processes if (fd := _pin(pid, mark)) is not None]
    try:
        for fd in pinned:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
        deadline = time.monotonic() + grace_period
        while any(map(_alive, pinned)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for fd in pinned:
            if _alive(fd):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(map(_alive, pinned)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(pinned)
    finally:
        for fd in pinned:
            os.close(fd)
