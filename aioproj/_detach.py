"""Detached local runs: a small ``aioproj run --wait`` process that outlives its caller.

``run(..., detach=True)`` (and ``aioproj run --no-wait`` on the local backend) hands the
run to a new aioproj process in its own session. That process starts the run, reports its
run id (or the error) on a pipe, then supervises it and records its final status, as
MLflow's asynchronous local runs do by re-executing its CLI.

Its arguments (the project URI, which may hold a git password, parameter values, the
backend_config JSON) reach it on another pipe, never on its command line: a command line
is readable by every local user (``ps``, ``/proc/PID/cmdline``) for the whole run. Its
command line is ``python -m aioproj`` and nothing else. The caller gets a handle
whose :class:`DetachedExecution` follows that process: waiting waits for it to exit and
reads the status it recorded; cancelling sends it SIGTERM, on which it stops the run and
records KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anyio

from aioproj._status import RunStatus
from aioproj.errors import ExecutionError, InvalidArgumentError

if TYPE_CHECKING:
    from aioproj._run_args import RunArgs
    from aioproj.tracking.base import TrackingStore

__all__ = [
    "ARGV_FD_VAR",
    "REPORT_FD_VAR",
    "DetachedExecution",
    "SupervisorError",
    "check_detach",
    "cli_args",
    "read_argv",
    "spawn_supervisor",
]

#: Set in a detached supervisor's environment: the pipe on which it reports its run id.
REPORT_FD_VAR = "_AIOPROJ_DETACHED_REPORT_FD"
#: Set in a detached supervisor's environment: the pipe from which it reads its arguments
#: (a JSON list of strings).
ARGV_FD_VAR = "_AIOPROJ_DETACHED_ARGV_FD"


class SupervisorError(ExecutionError):
    """The detached process could not start the run; the message is its error."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        #: True when the supervisor refused its arguments (a usage error).
        self.usage = usage


def cli_args(args: RunArgs) -> list[str]:
    """The ``aioproj run`` arguments of a :func:`aioproj.run` call."""
    argv = ["run", args.uri, "-e", args.entry_point, "--wait"]
    if args.version is not None:
        argv += ["-v", args.version]
    for name, value in (args.parameters or {}).items():
        argv += ["-P", f"{name}={value}"]
    for name, flag in (args.docker_args or {}).items():
        if flag is True:
            argv += ["-A", str(name)]
        elif flag is not False:
            argv += ["-A", f"{name}={flag}"]
    if args.experiment_name is not None:
        argv += ["--experiment-name", args.experiment_name]
    if args.experiment_id is not None:
        argv += ["--experiment-id", str(args.experiment_id)]
    config = args.backend_config
    if config is not None:
        argv += ["-c", config if isinstance(config, str) else json.dumps(config)]
    if args.storage_dir is not None:
        argv += ["--storage-dir", os.fspath(args.storage_dir)]
    if args.run_id is not None:
        argv += ["--run-id", args.run_id]
    if args.run_name is not None:
        argv += ["--run-name", args.run_name]
    if args.env_manager is not None:
        argv += ["--env-manager", args.env_manager]
    if args.build_image:
        argv.append("--build-image")
    return argv


def spawn_supervisor(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Start ``python -m aioproj <argv>`` detached; return (its pid, the run id it reports).

    The supervisor runs in its own session with stdin, stdout and stderr on /dev/null.
    It reads ``argv`` from a pipe on descriptor 4 (named by ARGV_FD_VAR), so its command
    line is ``python -m aioproj`` whatever the arguments hold, and reports on the write
    end of another pipe, descriptor 3 (named by REPORT_FD_VAR). Blocks until it has
    started the run or failed: call it in a worker thread from async code. It is this
    process's child: :class:`DetachedExecution` reaps it.

    Raises:
        SupervisorError: the supervisor reported an error, or exited before starting
            the run.
    """
    payload = json.dumps(list(argv)).encode()
    # Every descriptor is close-on-exec: only the two dups below are inherited.
    read_fd, write_fd = os.pipe()
    argv_read, argv_write = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "aioproj"],
            {**env, REPORT_FD_VAR: str(_REPORT_FD), ARGV_FD_VAR: str(_ARGV_FD)},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_fd, _REPORT_FD),
                (os.POSIX_SPAWN_DUP2, argv_read, _ARGV_FD),
            ],
            setsid=True,
        )
    except BaseException:
        os.close(read_fd)
        os.close(argv_write)
        raise
    finally:
        os.close(write_fd)
        os.close(argv_read)
    # Written after the spawn: the child reads while we write, so any size fits. If it
    # died first, the write fails and its report (none) says so below.
    with contextlib.suppress(BrokenPipeError), os.fdopen(argv_write, "wb") as pipe:
        pipe.write(payload)
    with os.fdopen(read_fd) as pipe:
        kind, _, text = pipe.read().partition(" ")
    if kind == "ok":
        return pid, text
    _, status = os.waitpid(pid, 0)
    if kind not in ("error", "usage"):
        code = os.waitstatus_to_exitcode(status)
        text = f"the detached aioproj process exited ({code}) before starting the run"
    raise SupervisorError(text, usage=kind == "usage")


#: The descriptor on which a detached supervisor reports.
_REPORT_FD = 3
#: The descriptor from which a detached supervisor reads its arguments.
_ARGV_FD = 4


def read_argv(fd: int) -> list[str]:
    """The arguments a detached supervisor was given on descriptor ``fd`` (closed after).

    Raises:
        ValueError: the pipe did not hold a JSON list of strings.
    """
    with os.fdopen(fd, "rb") as pipe:
        argv = json.loads(pipe.read())
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        raise ValueError("the detached aioproj process got no argument list")
    return argv


class DetachedExecution:
    """A local run supervised by a detached aioproj process, as the handle sees it.

    The supervisor records the run's final status itself (``records_own_status``), and
    the run outlives the caller's event loop (``outlives_caller``).
    """

    waits_for_stop = True
    records_own_status = True
    outlives_caller = True

    def __init__(self, pid: int, run_id: str, store: TrackingStore) -> None:
        #: The process id of the detached supervisor.
        self.pid = pid
        self._run_id = run_id
        self._store = store
        self._status = RunStatus.RUNNING
        self._exited = anyio.Event()

    def status(self) -> RunStatus:
        return self._status

    async def wait(self) -> RunStatus:
        """Wait for the supervisor to exit, then read the status it recorded."""
        await self._wait_exit()
        record = await self._store.get_run(self._run_id)
        status = RunStatus(record.status) if record.status != "RUNNING" else RunStatus.FAILED
        self._status = status
        return status

    async def _wait_exit(self) -> None:
        from aioproj._process import open_pidfd

        pidfd = open_pidfd(self.pid)
        try:
            while not _reaped(self.pid):
                if pidfd is not None:
                    await anyio.wait_readable(pidfd)
                else:
                    await anyio.sleep(0.1)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            self._exited.set()

    async def cancel(self) -> None:
        """SIGTERM the supervisor: it stops the run (SIGTERM, grace, SIGKILL) and records
        KILLED; returns once it has exited."""
        if self._exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        await self._wait_exit()


def _reaped(pid: int) -> bool:
    """True once ``pid`` has exited (and is reaped, if it is our child)."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (any more): is it still there?
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return done == pid


def check_detach(backend: object, synchronous: bool, docker_auth: object) -> None:
    """Raise InvalidArgumentError for a ``detach=True`` that cannot be honoured."""
    if backend != "local":
        raise InvalidArgumentError(
            "detach=True is for the local backend: remote runs (Databricks, Kubernetes)"
            " go on without their caller already."
        )
    if synchronous:
        raise InvalidArgumentError(
            "detach=True returns as soon as the run has started: pass synchronous=False."
        )
    if docker_auth is not None:
        raise InvalidArgumentError(
            "docker_auth cannot be handed to a detached run (its password would be on a"
            " command line): run `docker login` first and leave docker_auth out."
        )
