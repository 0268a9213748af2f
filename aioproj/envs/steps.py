"""One build step of an environment: a child process whose output is kept for errors.

Each step says what it does as it starts, every :data:`PROGRESS_INTERVAL` seconds while it
runs (with its latest output line) and when it is done, on the ``aioproj.envs`` logger at
INFO: an environment build of several minutes shows where it is instead of staying silent
(``aioproj run`` and ``aioproj sweep`` print these lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio
from anyio.abc import Process

from aioproj._marks import marked_env
from aioproj._paths import process_temp_prefix
from aioproj.errors import EnvironmentBuildError

__all__ = ["PROGRESS_INTERVAL", "OutputTail", "kill_group", "run_step", "supervise"]

logger = logging.getLogger("aioproj.envs")

#: Seconds between the "still running" lines of a long step.
PROGRESS_INTERVAL = 15.0

#: Bytes of a step's output kept for the error message.
_TAIL_BYTES = 16_384
#: Lines of that output shown in the error message.
_TAIL_LINES = 40


class OutputTail:
    """The last bytes of a process's output, for error messages."""

    def __init__(self, limit: int = _TAIL_BYTES) -> None:
        self._limit = limit
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]

    def last_line(self) -> str:
        """The last non-empty line so far, decoded (at most 120 characters)."""
        lines = self._data[-4096:].decode("utf-8", errors="replace").splitlines()
        for line in reversed(lines):
            if line.strip():
                return line.strip()[:120]
        return ""

    def text(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines, decoded."""
        decoded = self._data.decode("utf-8", errors="replace").rstrip()
        return "\n".join(decoded.splitlines()[-lines:])


async def run_step(
    argv: Sequence[str | Path],
    *,
    what: str,
    hint: str,
    cwd: Path,
    env: Mapping[str, str],
    on_output: Callable[[bytes], None] | None = None,
) -> None:
    """Run ``argv`` in its own process group, stdout and stderr merged.

    ``what`` says what the step does and ``hint`` what the user can do, both for the
    error. Raises :class:`EnvironmentBuildError` with the command and the tail of its
    output if it cannot start or exits non-zero. On cancellation the whole process group
    is killed and reaped before the cancellation propagates. The process carries the
    mark of the run preparation it belongs to (:mod:`aioproj._marks`), so ``aioproj
    recover`` stops it if the driver dies during the build.

    The step's ``TMPDIR`` (and ``TMP``, ``TEMP``) is a directory of its own, removed when
    it ends, on every path: what pip, ensurepip, uv or conda leave there when a build is
    cancelled or fails goes with it (``aioproj recover`` removes a dead driver's).
    """
    args = [str(a) for a in argv]
    temp = await anyio.to_thread.run_sync(
        lambda: tempfile.mkdtemp(prefix=process_temp_prefix("build"))
    )
    try:
        step_env = {**marked_env(env), "TMPDIR": temp, "TMP": temp, "TEMP": temp}
        await _run_in(args, what, hint, cwd, step_env, on_output)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                functools.partial(shutil.rmtree, temp, ignore_errors=True)
            )


async def _run_in(
    args: list[str],
    what: str,
    hint: str,
    cwd: Path,
    env: dict[str, str],
    on_output: Callable[[bytes], None] | None,
) -> None:
    try:
        process = await anyio.open_process(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise EnvironmentBuildError(
            f"{what} failed: cannot run {shlex.join(args)}: {exc.strerror or exc}. {hint}"
        ) from exc
    tail = OutputTail()
    progress = _Progress(what, tail)
    try:
        code = await supervise(process, tail, on_output)
    finally:
        progress.stop()
    if code != 0:
        raise EnvironmentBuildError(
            f"{what} failed (exit code {code}) running: {shlex.join(args)}\n"
            f"--- last output ---\n{tail.text()}\n---\n{hint}"
        )
    logger.info("%s: done in %.1f s", what, progress.seconds())


class _Progress:
    """Says that a step started, then every PROGRESS_INTERVAL seconds that it still runs
    (with its latest output line), from loop callbacks: no task, nothing to cancel but a
    timer."""

    def __init__(self, what: str, tail: OutputTail) -> None:
        self._what = what
        self._tail = tail
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        logger.info("%s ...", what)
        self._timer = self._loop.call_later(PROGRESS_INTERVAL, self._report)

    def seconds(self) -> float:
        return self._loop.time() - self._started

    def _report(self) -> None:
        last = self._tail.last_line()
        logger.info(
            "%s: still running (%.0f s)%s",
            self._what,
            self.seconds(),
            f"; last output: {last}" if last else "",
        )
        self._timer = self._loop.call_later(PROGRESS_INTERVAL, self._report)

    def stop(self) -> None:
        self._timer.cancel()


async def supervise(
    process: Process,
    tail: OutputTail,
    on_output: Callable[[bytes], None] | None = None,
    *,
    stdin: bytes | None = None,
) -> int:
    """Write ``stdin`` (if any) and close it, collect output until exit; return the exit
    code. On any error or cancellation the process group is killed and reaped first."""
    try:
        if stdin is not None:
            assert process.stdin is not None
            await process.stdin.send(stdin)
            await process.stdin.aclose()
        assert process.stdout is not None
        async for chunk in process.stdout:
            tail.add(chunk)
            if on_output is not None:
                on_output(chunk)
        return await process.wait()
    except BaseException:
        kill_group(process.pid)
        with anyio.CancelScope(shield=True):
            await process.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)
