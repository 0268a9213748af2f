"""A child process in its own process group, supervised without threads.

Exit is awaited on a pidfd where the platform has one (Linux ≥ 5.3), so hundreds of live
children cost no thread each (asyncio's default child watcher before Python 3.12 starts a
thread per child). Output is read from a non-blocking pipe on the event loop. Stopping
means SIGTERM to the whole group, a grace period, then SIGKILL; the child is always reaped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

__all__ = ["ProcessGroup"]

_HAS_PIDFD = hasattr(os, "pidfd_open")

#: Groups still alive, killed at interpreter exit if their owner never got to do it.
_LIVE_GROUPS: set[int] = set()


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_live_groups)


class ProcessGroup:
    """``bash -c command`` as the leader of a new session, with merged stdout/stderr."""

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
    ) -> None:
        # Popen forks and execs at once; that is what asyncio's own subprocess support
        # does on the loop thread too. The exec error pipe makes a bad cwd raise here.
        self._proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        self.pid = self._proc.pid
        _LIVE_GROUPS.add(self.pid)
        assert self._proc.stdout is not None
        self._out_fd = self._proc.stdout.fileno()
        os.set_blocking(self._out_fd, False)
        self._on_output = on_output
        self._pidfd: int | None = os.pidfd_open(self.pid) if _HAS_PIDFD else None
        self._exit_lock = anyio.Lock()
        self.returncode: int | None = None

    async def pump_output(self) -> None:
        """Read output until every writer has closed the pipe (EOF)."""
        fd = self._out_fd
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            except OSError:  # closed by aclose() during cancellation
                return
            if not data:
                return
            self._on_output(data)

    async def wait_exit(self) -> int:
        """Wait for the group leader to exit, reap it, return its exit code."""
        async with self._exit_lock:  # one watcher of the pidfd at a time
            while self.returncode is None:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                else:
                    await anyio.sleep(0.02)
                self._try_reap()
        return self.returncode

    def _try_reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; keep what Popen may have seen
            self.returncode = self._proc.returncode if self._proc.returncode is not None else -1
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            self._proc.returncode = self.returncode

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to every process of the group; False if none is left."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:  # pid reused by a process not ours: our group is gone
            return False
        return True

    async def stop(self, grace_period: float) -> None:
        """SIGTERM the group, wait up to ``grace_period``, then SIGKILL; reap the leader."""
        if self.signal_group(signal.SIGTERM):
            with anyio.move_on_after(grace_period):
                await self.wait_exit()
                while self.signal_group(0):  # stragglers still in the group
                    await anyio.sleep(0.02)
        self.signal_group(signal.SIGKILL)
        await self.wait_exit()

    async def reap_stragglers(self, grace_period: float) -> None:
        """After the leader exited: stop whatever it left running in its group."""
        if self.signal_group(0):
            await self.stop(grace_period)

    def close(self) -> None:
        """Release the pipe and the pidfd. Call once the group is gone."""
        _LIVE_GROUPS.discard(self.pid)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
