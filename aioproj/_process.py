"""A child process in its own process group, supervised without threads.

Exit is awaited on a pidfd where the platform has one (Linux ≥ 5.3), so hundreds of live
children cost no thread each (asyncio's default child watcher before Python 3.12 starts a
thread per child). Output is read from a non-blocking pipe on the event loop. Stopping
means SIGTERM to the whole group, a grace period, then SIGKILL; the leader is always
reaped, and the group counts as gone only when no live member is left in it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from aioproj._threads import run_short

__all__ = ["ProcessGroup", "open_pidfd"]

#: Signals Python ignores that a child should get with their default action, as
#: subprocess.Popen(restore_signals=True) does.
_RESET_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)

#: Groups that may still have members, killed at interpreter exit if their owner could not.
_LIVE_GROUPS: set[int] = set()

_POLL = 0.02


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_live_groups)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, if aioproj runs on asyncio (None on trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None where the kernel or a sandbox refuses one (then the
    exit is polled instead)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _live_members(pgid: int) -> bool:
    """True if a process of group ``pgid`` is alive, not counting zombies (blocking).

    Zombies count as members for ``kill(2)`` until whoever inherited them reaps them,
    which may be never (aioproj as PID 1 or a subreaper reaps its own below).
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(ChildProcessError):  # members that are our own children
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    if not sys.platform.startswith("linux"):
        return True
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _spawn(shell: str, command: str, cwd: Path, env: Mapping[str, str]) -> tuple[int, int]:
    """Start ``shell -c command`` in ``cwd`` as a session leader; return (pid, read fd).

    Blocking for as long as the child takes to exec (vfork semantics), which under load is
    milliseconds: callers run it in a worker thread, so a burst of hundreds of starts never
    stalls the event loop.
    """
    # posix_spawn has no working-directory action before Python 3.13: the shell changes
    # directory itself, then runs the command exactly as given.
    script = f"cd -- {shlex.quote(str(cwd))} || exit 127\n{command}"
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(
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
    _LIVE_GROUPS.add(pid)
    os.set_blocking(read_fd, False)
    return pid, read_fd


def _spawn_watched(
    shell: str, command: str, cwd: Path, env: Mapping[str, str]
) -> tuple[int, int, int | None]:
    """:func:`_spawn`, and the child's pidfd, in the same worker-thread call."""
    pid, read_fd = _spawn(shell, command, cwd, env)
    return pid, read_fd, open_pidfd(pid)


class ProcessGroup:
    """A shell command as the leader of a new session, with merged stdout/stderr.

    Started with ``posix_spawn``: unlike ``subprocess.Popen`` it needs no read of an
    exec-error pipe, and glibc spawns with vfork, which stays cheap however large the
    parent process is. Create one with :meth:`start`.
    """

    def __init__(
        self,
        pid: int,
        read_fd: int,
        on_output: Callable[[bytes], None],
        pidfd: int | None = None,
    ) -> None:
        self.pid = pid
        self._out_fd: int | None = read_fd
        self._on_output = on_output
        self._pidfd = pidfd if pidfd is not None else open_pidfd(pid)
        self._exit_lock = anyio.Lock()
        self.returncode: int | None = None
        self.empty = False

    @classmethod
    async def start(
        cls,
        shell: str,
        command: str,
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
    ) -> ProcessGroup:
        """Start the group (in a worker thread; not interrupted by cancellation, so a
        started process is never lost). Raises OSError if the shell cannot be started."""
        pid, read_fd, pidfd = await run_short(_spawn_watched, shell, command, cwd, env)
        return cls(pid, read_fd, on_output, pidfd)

    async def pump_output(self) -> None:
        """Read output until every writer has closed the pipe (EOF), or it is closed."""
        while (fd := self._out_fd) is not None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                try:
                    await anyio.wait_readable(fd)
                except anyio.ClosedResourceError:
                    return
                continue
            if not data:
                return
            self._on_output(data)

    async def follow(self, grace_period: float) -> int:
        """Read output and wait for the leader's exit; reap it and what it left in its
        group; return its exit code.

        Output is read until EOF, or until ``grace_period`` after the group is gone (a
        process that left the group may keep the pipe open). On asyncio the pipe and the
        pidfd are watched by loop callbacks feeding two futures: no task and no wait per
        chunk for what is most runs' whole life. Elsewhere, :meth:`pump_output` and
        :meth:`wait_exit` in a task group.
        """
        loop = _asyncio_loop()
        if loop is None or self._pidfd is None or self._out_fd is None:
            return await self._follow_with_tasks(grace_period)
        async with self._exit_lock:  # one watcher of the pidfd at a time
            exited, eof = loop.create_future(), loop.create_future()
            out_fd, pidfd = self._out_fd, self._pidfd

            def on_output() -> None:
                if self._out_fd is None:
                    loop.remove_reader(out_fd)
                    return
                try:
                    data = os.read(out_fd, 65536)
                except BlockingIOError:
                    return
                if data:
                    self._on_output(data)
                    return
                loop.remove_reader(out_fd)
                if not eof.done():
                    eof.set_result(None)

            def on_exit() -> None:
                self._try_reap()
                if self.returncode is not None:
                    loop.remove_reader(pidfd)
                    if not exited.done():
                        exited.set_result(None)

            loop.add_reader(out_fd, on_output)
            loop.add_reader(pidfd, on_exit)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        try:
            await self.reap_stragglers(grace_period)
            with anyio.move_on_after(grace_period):
                await eof
        finally:
            loop.remove_reader(out_fd)
        assert self.returncode is not None
        return self.returncode

    async def _follow_with_tasks(self, grace_period: float) -> int:
        pumped = anyio.Event()

        async def pump() -> None:
            try:
                await self.pump_output()
            finally:
                pumped.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            code = await self.wait_exit()
            await self.reap_stragglers(grace_period)
            # A process that left the group may still hold the pipe: stop reading then.
            with anyio.move_on_after(grace_period):
                await pumped.wait()
            tg.cancel_scope.cancel()
        return code

    async def wait_exit(self) -> int:
        """Wait for the group leader to exit, reap it, return its exit code."""
        async with self._exit_lock:  # one watcher of the pidfd at a time
            while self.returncode is None:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                else:
                    await anyio.sleep(_POLL)
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

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process of the group (nothing if none is left)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def _wait_empty(self) -> None:
        # Members other than the leader are not our children: no event says they are gone.
        while await run_short(_live_members, self.pid):  # noqa: ASYNC110
            await anyio.sleep(_POLL)
        self.empty = True
        _LIVE_GROUPS.discard(self.pid)

    async def stop(self, grace_period: float) -> None:
        """SIGTERM the group, wait up to ``grace_period`` for it to empty, then SIGKILL.

        Returns once the leader is reaped and no live member is left.
        """
        if self.empty:
            return
        self.signal_group(signal.SIGTERM)
        with anyio.move_on_after(grace_period):
            await self.wait_exit()
            await self._wait_empty()
        if not self.empty:
            self.signal_group(signal.SIGKILL)
            await self.wait_exit()
            await self._wait_empty()

    def _has_members(self) -> bool:
        """Whether ``kill(2)`` still finds the group (a syscall, no I/O: fine on the loop)."""
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def reap_stragglers(self, grace_period: float) -> None:
        """After the leader exited: stop whatever it left running in its group."""
        if self._has_members() and await run_short(_live_members, self.pid):
            await self.stop(grace_period)
        else:
            self.empty = True
            _LIVE_GROUPS.discard(self.pid)

    def close(self) -> None:
        """Release the pipe and the pidfd (idempotent). Readers waiting on them return."""
        if self._out_fd is not None:
            fd, self._out_fd = self._out_fd, None
            anyio.notify_closing(fd)
            os.close(fd)
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)

    def discard(self) -> None:
        """After a failed start: kill whatever started and release everything, at once."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.close()
        _LIVE_GROUPS.discard(self.pid)
