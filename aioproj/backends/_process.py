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
import shlex
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

__all__ = ["ProcessGroup"]

_HAS_PIDFD = hasattr(os, "pidfd_open")

#: Signals Python ignores that a child should get with their default action, as
#: subprocess.Popen(restore_signals=True) does.
_RESET_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)

#: Groups still alive, killed at interpreter exit if their owner never got to do it.
_LIVE_GROUPS: set[int] = set()


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_live_groups)


class ProcessGroup:
    """A shell command as the leader of a new session, with merged stdout/stderr.

    Started with ``posix_spawn``: unlike ``subprocess.Popen`` it needs no blocking read of
    an exec-error pipe on the event loop, and glibc spawns with vfork, which stays cheap
    however large the parent process is.
    """

    def __init__(
        self,
        shell: str,
        command: str,
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
    ) -> None:
        # posix_spawn has no working-directory action before Python 3.13: the shell
        # changes directory itself, then runs the command exactly as given.
        script = f"cd -- {shlex.quote(str(cwd))} || exit 127\n{command}"
        read_fd, write_fd = os.pipe()
        try:
            self.pid = os.posix_spawn(
                shell,
                [shell, "-c", script],
                dict(env),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_fd, 1),
                    (os.POSIX_SPAWN_DUP2, write_fd, 2),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=_RESET_SIGNALS,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        _LIVE_GROUPS.add(self.pid)
        os.set_blocking(read_fd, False)
        self._out_fd: int | None = read_fd
        self._on_output = on_output
        self._pidfd: int | None = os.pidfd_open(self.pid) if _HAS_PIDFD else None
        self._exit_lock = anyio.Lock()
        self.returncode: int | None = None

    async def pump_output(self) -> None:
        """Read output until every writer has closed the pipe (EOF)."""
        fd = self._out_fd
        assert fd is not None, "output already closed"
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
        except ChildProcessError:  # reaped by someone else: the status is lost
            self.returncode = -1
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

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
                # Stragglers are not our children: no event tells when they are gone.
                while self.signal_group(0):  # noqa: ASYNC110
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
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
