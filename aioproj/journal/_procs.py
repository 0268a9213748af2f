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
from collections.abc import Callable, Collection

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
    wanted = {f"{journal_id}/" for journal_id in journal_ids}
    return _scan(lambda mark: mark[: mark.find("/") + 1] in wanted)


def _scan(wanted: Callable[[str], bool]) -> dict[str, list[int]]:
    if not sys.platform.startswith("linux"):
        return {}
    me = os.getpid()
    found: dict[str, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        mark = _mark_of(int(name))
        if mark is not None and wanted(mark):
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


def _signal(pidfd: int, pid: int, sig: int) -> None:
    """Send ``sig`` to a pinned process, and to its process group if it leads one.

    The group gets it too so that a child forked while the leader was being scanned,
    which carries the mark but was not seen, is not left behind. The pinned leader keeps
    the group id from being reused.
    """
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, sig)
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)


def stop_marked(journal_ids: Collection[str], grace_period: float, *, rounds: int = 5) -> int:
    """Stop every process marked by one of ``journal_ids``: SIGTERM (to each and to the
    groups they lead), SIGKILL what is left after ``grace_period``; look again, as a
    process may have appeared meanwhile (a child a dying driver was spawning), until
    none is found. Returns how many were signalled."""
    wanted = {f"{journal_id}/" for journal_id in journal_ids}
    if not wanted:
        return 0
    total = 0
    for _ in range(rounds):
        found = _scan(lambda mark: mark[: mark.find("/") + 1] in wanted)
        pinned = [
            (fd, pid)
            for mark, pids in found.items()
            for pid in pids
            if (fd := _pin(pid, mark)) is not None
        ]
        if not pinned:
            break
        total += len(pinned)
        try:
            for fd, pid in pinned:
                _signal(fd, pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_period
            while any(_alive(fd) for fd, _ in pinned) and time.monotonic() < deadline:
                time.sleep(0.05)
            for fd, pid in pinned:
                if _alive(fd):
                    _signal(fd, pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while any(_alive(fd) for fd, _ in pinned) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            for fd, _ in pinned:
                os.close(fd)
    return total
